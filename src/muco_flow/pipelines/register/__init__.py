"""`register`: the trained model as a new MLflow Model Registry version, alias `challenger`."""

from muco_flow.pipelines.register.pipeline import create_pipeline

__all__ = ["create_pipeline"]
