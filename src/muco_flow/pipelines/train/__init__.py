"""`train`: DeepSpeed ZeRO training of the MuCo embedder, launched with torchrun."""

from muco_flow.pipelines.train.pipeline import create_pipeline

__all__ = ["create_pipeline"]
