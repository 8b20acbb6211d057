"""Nodes of the `finetune` pipeline: the training stage run as MuCo's stage 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from muco_flow.mining.lineage import mined_negatives_lineage
from muco_flow.tracking import resolve_tracking_uri
from muco_flow.training.config import TrainingConfig, laid_over
from muco_flow.training.finetune_config import FinetuneConfig
from muco_flow.training.init_model import resolve_init_model
from muco_flow.training.stage import run_training_stage


def finetuning_settings(training: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`training` with `finetune.training` laid over it, nested dicts merged key by key."""
    return laid_over(training, overrides, "finetune.training")


def finetune_muco_model(
    samples_dir: str,
    shards_dir: str,
    train_run: dict[str, Any],
    finetune: dict[str, Any],
    training: dict[str, Any],
    backbone: dict[str, Any],
    format_params: dict[str, Any],
    mlflow: dict[str, Any],
    kedro_run: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, Any]:
    """Fine-tunes the stage-1 model (``finetune.init_from``, default `train`'s) on the MMEB-train samples.

    Returns the run record (with the stage-1 run as ``parent_run_id``), loss history and loss plot.
    """
    stage = FinetuneConfig.from_dict(finetune)
    # stage 2 starts from finetune.init_from; training.init_from was stage 1's start (its run records it)
    settings = finetuning_settings(training, stage.training or {}) | {"init_from": None}
    output_dir = TrainingConfig.from_dict(settings).output_dir  # checked before a model is fetched
    tracking_uri = resolve_tracking_uri(mlflow.get("tracking_uri"))
    model_dir, parent_run_id = resolve_init_model(
        stage.init_from, train_run, tracking_uri, Path(output_dir) / "init_model"
    )
    return run_training_stage(
        samples_dir,
        shards_dir,
        model_dir,
        settings,
        backbone,
        format_params,
        mlflow,
        kedro_run,
        stage="finetune",
        parent_run_id=parent_run_id,
        data_lineage=mined_negatives_lineage(shards_dir),  # {} for the given negatives
    )
