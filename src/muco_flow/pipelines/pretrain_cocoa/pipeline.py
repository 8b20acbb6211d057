from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.hooks import KEDRO_RUN, MLFLOW_TAG
from muco_flow.pipelines.pretrain_cocoa.nodes import pretrain_cocoa_model


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                pretrain_cocoa_model,
                [
                    "m3t_conversations",
                    "m3t_shards",
                    "backbone_checkpoint",
                    "params:cocoa",
                    "params:training",
                    "params:backbone",
                    "params:format",
                    "params:mlflow",
                    KEDRO_RUN,
                ],
                ["cocoa_run", "cocoa_loss_history", "cocoa_loss_plot"],
                name="pretrain_cocoa_model",
                tags=[MLFLOW_TAG],
            )
        ],
        namespace="pretrain_cocoa",
        prefix_datasets_with_namespace=False,
    )
