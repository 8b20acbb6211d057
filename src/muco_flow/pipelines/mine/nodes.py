"""Nodes of the `mine` pipeline."""

from __future__ import annotations

from typing import Any

from muco_flow.data.ingest import MetaPart
from muco_flow.datasets.file_tree import TreeWriter
from muco_flow.mining.config import MiningConfig
from muco_flow.mining.snapshot import mined_snapshot_writer
from muco_flow.tracking import resolve_tracking_uri


def mine_hard_negatives(
    parts: list[MetaPart],
    train_run: dict[str, Any],
    mine: dict[str, Any],
    backbone: dict[str, Any],
    format_params: dict[str, Any],
    mlflow: dict[str, Any],
) -> TreeWriter:
    """A writer of the snapshot's meta files with mined negatives and their manifest (saved by the catalog)."""
    config = MiningConfig.from_dict(mine)  # checked before a model is fetched
    tracking_uri = resolve_tracking_uri(mlflow.get("tracking_uri"))
    return mined_snapshot_writer(parts, train_run, config, backbone, format_params, tracking_uri)
