from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.pipelines.mine.nodes import mine_hard_negatives


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                mine_hard_negatives,
                [
                    "mmeb_train_source",
                    "train_run",
                    "params:mine",
                    "params:backbone",
                    "params:format",
                    "params:mlflow",
                ],
                "mmeb_train_mined",
                name="mine_hard_negatives",
            )
        ],
        namespace="mine",
        prefix_datasets_with_namespace=False,
    )
