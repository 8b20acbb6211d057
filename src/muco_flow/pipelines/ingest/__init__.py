"""`ingest`: an M3T snapshot (local or S3) -> validated shards, rejects and a manifest."""

from muco_flow.pipelines.ingest.pipeline import create_pipeline

__all__ = ["create_pipeline"]
