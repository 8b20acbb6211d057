"""`finetune_data`: an MMEB-train snapshot (MuCo's stage 2) -> validated shards -> tokenized stage-2 pieces."""

from muco_flow.pipelines.finetune_data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
