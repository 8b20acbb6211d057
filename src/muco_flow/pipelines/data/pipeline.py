from kedro.pipeline import Pipeline

from muco_flow.pipelines import format as format_pipeline
from muco_flow.pipelines import ingest


def create_pipeline(**kwargs) -> Pipeline:
    return ingest.create_pipeline() + format_pipeline.create_pipeline()
