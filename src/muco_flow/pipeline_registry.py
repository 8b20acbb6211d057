"""The project's pipelines: one folder each under muco_flow/pipelines/.

Each pipeline a run can name has a folder, `data` (ingest + format) too: Kedro
imports only the folders of the pipelines a run names (``find_pipelines``).
"""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# Promotion is a decision, made in the MLflow UI or with --pipelines=promote.
# MuCo's stage 2 runs on its own (kedro run --pipelines=finetune_data,finetune), so the default run stays short;
# so does mining its hard negatives (kedro run --pipelines=mine,finetune_data_mined,finetune), and CoCoA's
# optional stage 0 (kedro run --pipelines=pretrain_cocoa, then train with training.init_from; docs/cocoa.md).
NOT_IN_DEFAULT_RUN = {"promote", "finetune_data", "finetune", "mine", "finetune_data_mined", "pretrain_cocoa"}


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    # Kedro orders nodes by their datasets, so the sum runs in data order.
    pipelines["__default__"] = sum(
        (p for name, p in pipelines.items() if name not in NOT_IN_DEFAULT_RUN), start=Pipeline([])
    )
    return pipelines
