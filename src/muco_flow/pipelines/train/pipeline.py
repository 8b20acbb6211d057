from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.hooks import KEDRO_RUN, MLFLOW_TAG
from muco_flow.training.stage import run_training_stage


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                # the library function itself: it takes the parameters as Kedro passes them
                run_training_stage,
                [
                    "m3t_conversations",
                    "m3t_shards",
                    "backbone_checkpoint",
                    "params:training",
                    "params:backbone",
                    "params:format",
                    "params:mlflow",
                    KEDRO_RUN,
                ],
                ["train_run", "train_loss_history", "train_loss_plot"],
                name="train_muco_model",
                tags=[MLFLOW_TAG],
            )
        ],
        namespace="train",
        prefix_datasets_with_namespace=False,
    )
