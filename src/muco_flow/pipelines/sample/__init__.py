"""`sample`: writes the procedural M3T-mini sample into data/01_raw/."""

from muco_flow.pipelines.sample.pipeline import create_pipeline

__all__ = ["create_pipeline"]
