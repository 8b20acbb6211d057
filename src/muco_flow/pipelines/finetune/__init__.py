"""MuCo's stage 2: fine-tunes the stage-1 model on MMEB-train, then evaluates and registers it."""

from muco_flow.pipelines.finetune.pipeline import create_pipeline

__all__ = ["create_pipeline"]
