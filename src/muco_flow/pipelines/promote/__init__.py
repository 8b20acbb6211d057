"""`promote`: alias `champion` moves to the challenger only if it wins by the configured margin."""

from muco_flow.pipelines.promote.pipeline import create_pipeline

__all__ = ["create_pipeline"]
