from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.pipelines.finetune_data.nodes import (
    check_mmeb_train_quality,
    format_finetune_samples,
    plan_mmeb_train_ingest,
)


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                plan_mmeb_train_ingest,
                ["mmeb_train_source", "params:finetune_ingest"],
                "mmeb_train_shards",
                name="ingest_mmeb_train",
            ),
            node(
                check_mmeb_train_quality,
                ["mmeb_train_shards", "params:finetune_ingest"],
                "finetune_ingest_report",
                name="check_mmeb_train_quality",
            ),
            node(
                format_finetune_samples,
                ["mmeb_train_shards", "backbone_checkpoint", "params:backbone", "params:finetune_format"],
                "mmeb_train_samples",
                name="format_finetune_samples",
            ),
        ],
        namespace="finetune_data",
        prefix_datasets_with_namespace=False,
    )
