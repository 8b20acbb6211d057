"""CoCoA's stage 0: reconstruction pre-training of the backbone that stage 1 can start from (docs/cocoa.md)."""

from muco_flow.pipelines.pretrain_cocoa.pipeline import create_pipeline

__all__ = ["create_pipeline"]
