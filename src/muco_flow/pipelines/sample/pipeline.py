from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.pipelines.sample.nodes import generate_m3t_mini_sample, offer_sample_as_sources


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(generate_m3t_mini_sample, "params:m3t_mini", "m3t_mini_snapshot", name="generate_m3t_mini"),
            node(
                offer_sample_as_sources,
                "m3t_mini_snapshot",
                ["m3t_source", "mmeb_train_source"],
                name="offer_sample_as_sources",
            ),
        ],
        namespace="sample",
        prefix_datasets_with_namespace=False,
    )
