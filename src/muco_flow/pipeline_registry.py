"""The project's pipelines: one folder each under muco_flow/pipelines/."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    # Kedro orders nodes by their datasets, so the sum runs in data order.
    # Promotion is a decision, made in the MLflow UI or with --pipelines=promote;
    # stage 2 would take the default run past 10 minutes on 2 CPU cores
    # (README: `kedro run --pipelines=finetune_data,finetune`).
    not_default = {"promote", "finetune_data", "finetune"}
    pipelines["__default__"] = sum(p for name, p in pipelines.items() if name not in not_default)
    return pipelines
