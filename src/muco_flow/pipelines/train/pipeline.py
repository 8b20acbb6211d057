from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.hooks import KEDRO_RUN, MLFLOW_TAG
from muco_flow.pipelines.train.nodes import train_muco_model


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                train_muco_model,
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
        ]
    )
