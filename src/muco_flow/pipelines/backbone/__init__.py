"""`backbone`: builds the tiny Qwen2-VL preset into data/06_models/."""

from muco_flow.pipelines.backbone.pipeline import create_pipeline

__all__ = ["create_pipeline"]
