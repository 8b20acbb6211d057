from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.hooks import MLFLOW_TAG
from muco_flow.pipelines.promote.nodes import promote_challenger_if_better, stop_unless_promoted


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                promote_challenger_if_better,
                ["params:registry", "params:mlflow"],
                "promotion",
                name="promote_challenger_if_better",
                tags=[MLFLOW_TAG],
            ),
            node(stop_unless_promoted, "promotion", None, name="stop_unless_promoted"),
        ],
        namespace="promote",
        prefix_datasets_with_namespace=False,
    )
