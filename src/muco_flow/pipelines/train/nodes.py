"""Nodes of the `train` pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from muco_flow.data.conversations import FormatConfig
from muco_flow.tracking import check_tracking_server, resolve_tracking_uri, source_commit
from muco_flow.training.launch import launch_training, resolve_run_config
from muco_flow.training.report import loss_curve_figure, read_metrics


def train_muco_model(
    conversations_dir: str,
    shards_dir: str,
    checkpoint: str,
    training: dict[str, Any],
    backbone: dict[str, Any],
    format_params: dict[str, Any],
    mlflow: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, Any]:
    """Trains on every configured process; returns the run record, loss history and loss plot.

    Re-running resumes from the newest complete checkpoint of the same settings.
    """
    tracking_uri = resolve_tracking_uri(mlflow.get("tracking_uri"))
    check_tracking_server(tracking_uri)  # before any data or model is loaded
    config = resolve_run_config(
        training=training,
        backbone=backbone,
        encode_template=FormatConfig.from_params(format_params).templates.single_turn(),
        tracking_uri=tracking_uri,
        experiment=mlflow["experiment"],
        checkpoint=checkpoint,
        conversations_dir=conversations_dir,
        shards_dir=shards_dir,
    )
    config["git_commit"] = source_commit()  # lineage only: not part of the resume fingerprint
    launch_training(config)
    output_dir = Path(training["output_dir"])
    history = read_metrics(output_dir / "metrics.jsonl")
    run = json.loads((output_dir / "run.json").read_text())
    tenth = max(1, len(history) // 10)
    record = {
        "mlflow_run_id": run["mlflow_run_id"],
        "tracking_uri": tracking_uri,
        "model_dir": str(output_dir / "model"),
        "steps": int(history["step"].iloc[-1]),
        "loss_first_10pct": float(history["loss"].iloc[:tenth].mean()),
        "loss_last_10pct": float(history["loss"].iloc[-tenth:].mean()),
        "fingerprint": config["fingerprint"],
    }
    return record, history, loss_curve_figure(history)
