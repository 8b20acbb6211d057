from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.hooks import MLFLOW_TAG
from muco_flow.pipelines.register.nodes import register_trained_model


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                register_trained_model,
                ["train_run", "evaluation_metrics", "m3t_shards", "params:registry"],
                "registration",
                name="register_trained_model",
                tags=[MLFLOW_TAG],
            )
        ],
        namespace="register",
        prefix_datasets_with_namespace=False,
    )
