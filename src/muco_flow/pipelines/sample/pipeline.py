from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.pipelines.sample.nodes import generate_m3t_mini_sample


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline([node(generate_m3t_mini_sample, "params:m3t_mini", "m3t_mini_snapshot", name="generate_m3t_mini")])
