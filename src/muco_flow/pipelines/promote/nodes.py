"""Nodes of the `promote` pipeline."""

from __future__ import annotations

from typing import Any

from muco_flow.registry.promotion import PromotionPolicy, promote_challenger
from muco_flow.tracking import resolve_tracking_uri


def promote_challenger_if_better(registry: dict[str, Any], mlflow: dict[str, Any]) -> dict[str, Any]:
    """Moves `champion` to the `challenger` version if it wins by the configured margin."""
    return promote_challenger(
        resolve_tracking_uri(mlflow.get("tracking_uri")), registry["model_name"], PromotionPolicy.from_params(registry)
    )
