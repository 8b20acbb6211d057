from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.pipelines.backbone.nodes import build_tiny_backbone_preset, collect_tokenizer_corpus


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(collect_tokenizer_corpus, "m3t_mini_snapshot", "tokenizer_corpus", name="collect_tokenizer_corpus"),
            node(
                build_tiny_backbone_preset,
                ["tokenizer_corpus", "params:backbone.tiny_preset", "params:backbone.family"],
                "backbone_checkpoint",
                name="build_tiny_backbone",
            ),
        ],
        namespace="backbone",
        prefix_datasets_with_namespace=False,
    )
