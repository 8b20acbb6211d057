"""Promotion by alias: a version takes `champion` only when it beats the champion on the primary metric.

One policy, three places: `promote_challenger` (the `promote` pipeline) moves
`champion` to the `challenger` version; the gate receiver (``gate_server``)
checks every `champion` a person sets in the MLflow UI and undoes one that
fails; and before anyone acts, each version shows whether it may take
`champion` now (tag ``promotion.eligible``, reason on the first line of its
description) and the registered model's description states the policy. All
three judge with ``judge_versions``, from the metric each version was tagged
with at registration (``registration.lineage_tags``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from muco_flow.registry import CHALLENGER, CHAMPION, RegistryError, version_by_alias
from muco_flow.registry.registration import PRIMARY_METRIC_TAG, PRIMARY_METRIC_VALUE_TAG

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionPolicy:
    """When the challenger takes `champion`: higher primary metric by at least ``margin``.

    No defaults: the values are conf/base's (``RegistryConfig.promotion_policy``) or a caller's own.
    """

    primary_metric: str
    margin: float
    promote_first: bool


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
        return True, f"beats the champion: {comparison}"
    return False, f"does not beat the champion by the margin: {comparison}"


# The version the gate last let hold `champion` (a registered-model tag): the holder it restores.
APPROVED_CHAMPION_TAG = "promotion.approved_champion"
ELIGIBLE_TAG = "promotion.eligible"
GATE_DECISION_TAG = "promotion.gate"
# The first paragraph of every version's description: may it take `champion` now, and why.
GATE_LINE_PREFIX = "**Promotion gate:**"


def by_hand(policy: PromotionPolicy) -> PromotionPolicy:
    """The policy for a person setting the alias: ``promote_first`` keeps the first champion for people to choose."""
    return replace(policy, promote_first=True)


def _metric_of(version, metric: str) -> float:
    tagged = version.tags.get(PRIMARY_METRIC_TAG)
    if tagged is None or PRIMARY_METRIC_VALUE_TAG not in version.tags:
        raise RegistryError(f"version {version.version} of '{version.name}' has no {metric} tag: it was not evaluated")
    if tagged != metric:
        raise RegistryError(
            f"version {version.version} of '{version.name}' is tagged with {tagged}, but promotion compares {metric}"
        )
    return float(version.tags[PRIMARY_METRIC_VALUE_TAG])


def judge_versions(candidate, champion, policy: PromotionPolicy) -> tuple[bool, str]:
    """(may ``candidate`` take `champion` from ``champion``?, why): two registry versions (``champion`` None: none).

    A version without the compared metric's tags may not: the reason names what is missing.
    """
    if champion is not None and champion.version == candidate.version:
        return False, f"version {candidate.version} is already the champion"
    try:
        champion_score = _metric_of(champion, policy.primary_metric) if champion is not None else None
        return decide_promotion(_metric_of(candidate, policy.primary_metric), champion_score, policy)
    except RegistryError as err:
        return False, str(err)


def policy_statement(policy: PromotionPolicy) -> str:
    """The registered model's description: the gate, stated before anyone sets an alias."""
    return (
        f"{GATE_LINE_PREFIX} `{CHAMPION}` goes only to a version whose `{policy.primary_metric}` beats the "
        f"current champion's by at least {policy.margin} (registry.promotion.margin); with no champion yet, "
        "a person chooses the first one. Each version's tag `promotion.eligible` and the first line of its "
        f"description say whether it may take `{CHAMPION}` now. Where the gate receiver runs "
        '(docs/registry.md, "The gate in the UI"), a `champion` set in the UI that fails the gate is moved '
        "back to the previous champion, and the reason is written on both versions."
    )


def with_gate_paragraphs(description: str | None, *, gate_line: str | None = None, record: str | None = None) -> str:
    """``description`` with its first paragraph replaced by ``gate_line`` and ``record`` added just below it.

    The gate line stays first and the newest decision next, above the registration text and its metric table.
    """
    paragraphs = [p for p in (description or "").split("\n\n") if p.strip()]
    current = paragraphs.pop(0) if paragraphs and paragraphs[0].startswith(GATE_LINE_PREFIX) else None
    gate = gate_line or current
    return "\n\n".join([*([gate] if gate else []), *([record] if record else []), *paragraphs])


def show_eligibility(client, name: str, policy: PromotionPolicy, champion: str | None = None) -> dict[str, bool]:
    """Marks every version of ``name`` with whether it may take `champion` now, and why; {version: eligible}.

    Also states the policy in the registered model's description. Run after every change of `champion`.
    ``champion``: the version that holds it (default: the alias's), for the gate, which
    knows the holder while the alias may still point at a version it is undoing.
    """
    client.update_registered_model(name, description=policy_statement(policy))
    holder = client.get_model_version(name, champion) if champion else version_by_alias(client, name, CHAMPION)
    eligible: dict[str, bool] = {}
    for version in client.search_model_versions(f"name = '{name}'"):
        if holder is not None and version.version == holder.version:
            ok, reason = True, f"version {version.version} is the champion"
        else:
            ok, reason = judge_versions(version, holder, by_hand(policy))
        verdict = "eligible for champion" if ok else "not eligible for champion"
        line = f"{GATE_LINE_PREFIX} {verdict}: {reason}."
        if version.tags.get(ELIGIBLE_TAG) != str(ok).lower():
            client.set_model_version_tag(name, version.version, ELIGIBLE_TAG, str(ok).lower())
        description = with_gate_paragraphs(version.description, gate_line=line)
        if description != (version.description or ""):
            client.update_model_version(name, version.version, description=description)
        eligible[version.version] = ok
    return eligible


def record_decision(client, name: str, version: str, record: str) -> None:
    """Adds ``record`` (a dated decision) to the top of version ``version``'s description, below its gate line."""
    when = datetime.now(UTC).isoformat(timespec="seconds")
    previous = client.get_model_version(name, version).description
    client.update_model_version(name, version, description=with_gate_paragraphs(previous, record=f"{record} ({when})"))


def promote_challenger(tracking_uri: str, name: str, policy: PromotionPolicy) -> dict[str, Any]:
    """Moves `champion` to the `challenger` version if the policy says so; records why on the version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    challenger = version_by_alias(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"model '{name}' has no '{CHALLENGER}' version: run `kedro run --pipelines=register` first")
    champion = version_by_alias(client, name, CHAMPION)
    promote, reason = judge_versions(challenger, champion, policy)
    if promote:
        # the gate receiver sees this alias change too: the approved holder is set first, so it lets it stand
        client.set_registered_model_tag(name, APPROVED_CHAMPION_TAG, challenger.version)
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    # one tag (the version keeps few); the why, when and against what go into its description
    outcome = "promoted" if promote else "not_promoted"
    client.set_model_version_tag(name, challenger.version, "promotion", outcome)
    compared = f"version {champion.version}" if champion is not None else "no champion"
    record_decision(client, name, challenger.version, f"**Promotion** (compared with {compared}): {outcome}: {reason}")
    show_eligibility(client, name, policy)
    logger.info("%s version %s: %s", name, challenger.version, reason)
    champion_now = challenger.version if promote else (champion.version if champion is not None else None)
    return {
        "name": name,
        "challenger": int(challenger.version),
        "champion": int(champion_now) if champion_now is not None else None,
        "promoted": promote,
        "reason": reason,
    }
