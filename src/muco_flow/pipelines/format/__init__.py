"""`format`: ingested shards -> tokenized multi-turn (or single-turn) conversations."""

from muco_flow.pipelines.format.pipeline import create_pipeline

__all__ = ["create_pipeline"]
