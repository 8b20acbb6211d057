"""Nodes of the `pretrain_cocoa` pipeline: the training stage run as CoCoA's stage 0."""

from __future__ import annotations

from typing import Any

import pandas as pd

from muco_flow.training.cocoa_config import CocoaConfig
from muco_flow.training.config import laid_over
from muco_flow.training.stage import run_training_stage


def pretrain_cocoa_model(
    conversations_dir: str,
    shards_dir: str,
    checkpoint: str,
    cocoa: dict[str, Any],
    training: dict[str, Any],
    backbone: dict[str, Any],
    format_params: dict[str, Any],
    mlflow: dict[str, Any],
    kedro_run: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, Any]:
    """CoCoA's warm-up then EOS-bridged reconstruction on stage 1's conversations, from the backbone.

    `training` with `cocoa.training` laid over it, for ``cocoa.warmup_steps +
    cocoa.bridged_steps`` optimizer steps. Returns the run record (its
    ``model_dir`` is what `training.init_from` names), loss history and plot.
    """
    stage = CocoaConfig.from_dict(cocoa)
    settings = laid_over(training, stage.training or {}, "cocoa.training") | {"max_steps": stage.steps}
    return run_training_stage(
        conversations_dir,
        shards_dir,
        checkpoint,
        settings,
        backbone,
        format_params,
        mlflow,
        kedro_run,
        stage="cocoa",
        cocoa=stage.objective(),
    )
