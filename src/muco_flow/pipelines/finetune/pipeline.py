from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.hooks import KEDRO_RUN, MLFLOW_TAG
from muco_flow.pipelines.evaluate import create_pipeline as create_evaluate_pipeline
from muco_flow.pipelines.finetune.nodes import finetune_muco_model
from muco_flow.pipelines.register import create_pipeline as create_register_pipeline

# what fine-tuning shares with stage 1: the evaluation data, the baseline and the parameters
SHARED_INPUTS = {"m3t_mini_snapshot": "m3t_mini_snapshot", "backbone_checkpoint": "backbone_checkpoint"}


def create_pipeline(**kwargs) -> Pipeline:
    finetune = pipeline(
        [
            node(
                finetune_muco_model,
                [
                    "mmeb_train_samples",
                    "mmeb_train_shards",
                    "train_run",
                    "params:finetune",
                    "params:training",
                    "params:backbone",
                    "params:format",
                    "params:mlflow",
                    KEDRO_RUN,
                ],
                ["finetune_run", "finetune_loss_history", "finetune_loss_plot"],
                name="finetune_muco_model",
                tags=[MLFLOW_TAG],
            )
        ],
        namespace="finetune",
        prefix_datasets_with_namespace=False,
    )
    # the same evaluate and register, on the fine-tuned model: their datasets under finetune.*
    evaluate_and_register = pipeline(
        create_evaluate_pipeline() + create_register_pipeline(),
        inputs={"train_run": "finetune_run", "m3t_shards": "mmeb_train_shards"} | SHARED_INPUTS,
        parameters={"backbone", "evaluate", "format", "registry"},
        namespace="finetune",
    )
    return finetune + evaluate_and_register
