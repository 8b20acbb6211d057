from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.pipelines.format.nodes import format_conversations


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                format_conversations,
                ["m3t_shards", "backbone_checkpoint", "params:backbone", "params:format"],
                "m3t_conversations",
                name="format_conversations",
            )
        ],
        namespace="format",
        prefix_datasets_with_namespace=False,
    )
