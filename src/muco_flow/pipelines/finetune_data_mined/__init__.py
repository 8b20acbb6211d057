"""`finetune_data_mined`: `finetune_data` on the mined negatives (`mine`'s folder) instead of the given ones."""

from muco_flow.pipelines.finetune_data_mined.pipeline import create_pipeline

__all__ = ["create_pipeline"]
