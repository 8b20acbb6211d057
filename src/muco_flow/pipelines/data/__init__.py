"""`data`: ingest then format."""

from muco_flow.pipelines.data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
