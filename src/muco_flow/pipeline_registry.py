"""The project's pipelines: one folder each under muco_flow/pipelines/."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    # Kedro orders nodes by their datasets, so the sum runs in data order.
    # Promotion is a decision, made in the MLflow UI or with --pipelines=promote.
    pipelines["__default__"] = sum(p for name, p in pipelines.items() if name != "promote")
    return pipelines
