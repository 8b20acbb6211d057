from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.pipelines.ingest.nodes import check_ingest_quality, plan_ingest


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(plan_ingest, ["m3t_source", "params:ingest"], "m3t_shards", name="ingest_m3t_snapshot"),
            node(check_ingest_quality, ["m3t_shards", "params:ingest"], "ingest_report", name="check_ingest_quality"),
        ],
        namespace="ingest",
        prefix_datasets_with_namespace=False,
    )
