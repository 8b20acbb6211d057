"""`backbone`: builds the tiny preset of `backbone.family` (Qwen2-VL by default) into data/06_models/."""

from muco_flow.pipelines.backbone.pipeline import create_pipeline

__all__ = ["create_pipeline"]
