"""`evaluate`: MMEB, M-BEIR and held-out M3T retrieval for the trained model and a baseline."""

from muco_flow.pipelines.evaluate.pipeline import create_pipeline

__all__ = ["create_pipeline"]
