"""Nodes of the `promote` pipeline."""

from __future__ import annotations

from typing import Any

from muco_flow.registry.config import RegistryConfig
from muco_flow.registry.promotion import promote_challenger
from muco_flow.tracking import resolve_tracking_uri


def promote_challenger_if_better(registry: dict[str, Any], mlflow: dict[str, Any]) -> dict[str, Any]:
    """Moves `champion` to the `challenger` version if it wins by the configured margin."""
    config = RegistryConfig.from_dict(registry)  # checked before MLflow is reached
    return promote_challenger(
        resolve_tracking_uri(mlflow.get("tracking_uri")), config.model_name, config.promotion_policy()
    )


def stop_unless_promoted(promotion: dict[str, Any]) -> None:
    """Ends the run non-zero with the one-line reason when the challenger was not promoted.

    A separate node, so that promotion.json (the decision the node before wrote) is saved either way.
    """
    if not promotion["promoted"]:
        raise SystemExit(f"promotion refused for {promotion['name']} version {promotion['challenger']}: "
                         f"{promotion['reason']}")  # fmt: skip
