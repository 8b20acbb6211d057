"""`mine`: hard negatives for MMEB-train, mined with the stage-1 model (or any) and filtered for false negatives."""

from muco_flow.pipelines.mine.pipeline import create_pipeline

__all__ = ["create_pipeline"]
