"""Promotion by alias: the `challenger` version takes `champion` when it beats it on the primary metric.

People move `champion` in the MLflow UI; `promote_challenger` is the automatic
gate for pipelines. It compares the metric each version was tagged with at
registration (``registration.lineage_tags``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from muco_flow.registry import CHALLENGER, CHAMPION, RegistryError, version_by_alias
from muco_flow.registry.registration import PRIMARY_METRIC_TAG, PRIMARY_METRIC_VALUE_TAG

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionPolicy:
    """When the challenger takes `champion`: higher primary metric by at least ``margin``."""

    primary_metric: str
    margin: float = 0.0
    promote_first: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PromotionPolicy:
        promotion = params.get("promotion", {})
        return cls(
            primary_metric=params["primary_metric"],
            margin=float(promotion.get("margin", 0.0)),
            promote_first=bool(promotion.get("promote_first", False)),
        )


def decide_promotion(challenger: float, champion: float | None, policy: PromotionPolicy) -> tuple[bool, str]:
    """(promote?, why), given the two versions' primary metric (None: there is no champion)."""
    metric = policy.primary_metric
    if champion is None:
        if policy.promote_first:
            return True, f"no champion yet and promote_first is set ({metric} = {challenger:.4f})"
        return False, "no champion yet and promote_first is not set: promote in the MLflow UI"
    gain = challenger - champion
    comparison = f"{metric} {challenger:.4f} vs champion's {champion:.4f} (gain {gain:+.4f}, margin {policy.margin})"
    if gain >= policy.margin:
        return True, f"challenger beats the champion: {comparison}"
    return False, f"challenger does not beat the champion by the margin: {comparison}"


def _metric_of(version, metric: str) -> float:
    tagged = version.tags.get(PRIMARY_METRIC_TAG)
    if tagged is None or PRIMARY_METRIC_VALUE_TAG not in version.tags:
        raise RegistryError(f"version {version.version} of '{version.name}' has no {metric} tag: it was not evaluated")
    if tagged != metric:
        raise RegistryError(
            f"version {version.version} of '{version.name}' is tagged with {tagged}, but promotion compares {metric}"
        )
    return float(version.tags[PRIMARY_METRIC_VALUE_TAG])


def promote_challenger(tracking_uri: str, name: str, policy: PromotionPolicy) -> dict[str, Any]:
    """Moves `champion` to the `challenger` version if the policy says so; records why on the version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    challenger = version_by_alias(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"model '{name}' has no '{CHALLENGER}' version: run `kedro run --pipelines=register` first")
    champion = version_by_alias(client, name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        promote, reason = False, f"version {challenger.version} is already the champion"
    else:
        champion_score = _metric_of(champion, policy.primary_metric) if champion is not None else None
        promote, reason = decide_promotion(_metric_of(challenger, policy.primary_metric), champion_score, policy)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    # one tag (the version keeps few); the why, when and against what go into its description
    outcome = "promoted" if promote else "not_promoted"
    client.set_model_version_tag(name, challenger.version, "promotion", outcome)
    compared = f"version {champion.version}" if champion is not None else "no champion"
    when = datetime.now(UTC).isoformat(timespec="seconds")
    record = f"**Promotion** ({when}, compared with {compared}): {outcome}: {reason}"
    previous = client.get_model_version(name, challenger.version).description or ""
    client.update_model_version(name, challenger.version, description=f"{previous}\n\n{record}".strip())
    logger.info("%s version %s: %s", name, challenger.version, reason)
    champion_now = challenger.version if promote else (champion.version if champion is not None else None)
    return {
        "name": name,
        "challenger": int(challenger.version),
        "champion": int(champion_now) if champion_now is not None else None,
        "promoted": promote,
        "reason": reason,
    }
