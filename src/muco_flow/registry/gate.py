"""The promotion gate for aliases people set: checks each new `champion` and undoes one that fails.

MLflow's registry calls a webhook (event ``model_version_alias.created``) after
every alias change; ``gate_server`` receives it and calls ``check_champion``,
which judges the new holder against the previous one with the promotion policy
(``promotion.judge_versions``, as `promote` does). The previous holder is the
version the gate last approved, kept as the registered-model tag
``promotion.approved_champion``: the webhook names only the new holder.
``register_gate_webhook`` subscribes a receiver (idempotent).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

from muco_flow.registry import CHAMPION, version_by_alias
from muco_flow.registry.promotion import (
    APPROVED_CHAMPION_TAG,
    GATE_DECISION_TAG,
    PromotionPolicy,
    by_hand,
    judge_versions,
    record_decision,
    show_eligibility,
)

logger = logging.getLogger(__name__)

ALIAS_CREATED = "model_version_alias.created"
# How old a delivery may be (its signed timestamp), against replays of a captured request.
MAX_DELIVERY_AGE_S = 300


def webhook_name(model_name: str) -> str:
    return f"{model_name}-promotion-gate"


def signature_is_valid(
    secret: str, delivery_id: str, timestamp: str, body: bytes, signature_header: str, *, now: float | None = None
) -> bool:
    """Whether ``signature_header`` (``v1,<base64>``, several separated by spaces) signs this delivery.

    MLflow signs ``<delivery id>.<timestamp>.<body>`` with HMAC-SHA256 and the
    webhook's secret. A timestamp more than MAX_DELIVERY_AGE_S from ``now`` is refused.
    """
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    if age > MAX_DELIVERY_AGE_S:
        return False
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    offered = [part.split(",", 1)[1] for part in signature_header.split() if part.startswith("v1,")]
    return any(hmac.compare_digest(expected, candidate) for candidate in offered)


@dataclass(frozen=True)
class GateDecision:
    name: str
    version: str  # the version the alias was set on
    allowed: bool
    champion: str | None  # who holds `champion` after the gate acted
    reason: str


def check_champion(client, name: str, version: str, policy: PromotionPolicy) -> GateDecision:
    """Judges `champion` newly set on ``version``; if it fails, moves the alias back (or removes it).

    The reason goes on both versions: tag ``promotion.gate`` and a dated line at
    the top of their descriptions; then every version's eligibility is shown again.
    """
    model = client.get_registered_model(name)
    approved = model.tags.get(APPROVED_CHAMPION_TAG)
    if approved == version:  # the gate's own restore, or the approved holder set again
        return GateDecision(name, version, True, version, f"version {version} is the approved champion")
    candidate = client.get_model_version(name, version)
    previous = client.get_model_version(name, approved) if approved else None
    allowed, reason = judge_versions(candidate, previous, by_hand(policy))
    if allowed:
        client.set_registered_model_tag(name, APPROVED_CHAMPION_TAG, version)
        champion = version
        verdict = f"allowed: version {version} took `{CHAMPION}`" + (f" from version {approved}" if approved else "")
    elif previous is not None:
        client.set_registered_model_alias(name, CHAMPION, approved)
        champion = approved
        verdict = f"refused: `{CHAMPION}` set on version {version} was moved back to version {approved}"
    else:
        client.delete_registered_model_alias(name, CHAMPION)
        champion = None
        verdict = f"refused: `{CHAMPION}` set on version {version} was removed"
    line = f"**Gate** {verdict}: {reason}"
    affected = [version, *([approved] if approved else [])]
    for number in affected:
        record_decision(client, name, number, line)
    show_eligibility(client, name, policy, champion)
    for number in affected:  # the tags last: who reads them finds the descriptions and eligibility written
        client.set_model_version_tag(name, number, GATE_DECISION_TAG, f"{verdict}: {reason}"[:5000])
    logger.info("%s: %s: %s", name, verdict, reason)
    return GateDecision(name, version, allowed, champion, reason)


def register_gate_webhook(client, name: str, url: str, secret: str, policy: PromotionPolicy):
    """Subscribes ``url`` to alias changes (one webhook per model, updated in place); returns the webhook.

    Also adopts the current `champion` as the approved holder (whoever starts the
    gate accepts the registry as it is), and shows the policy and every version's eligibility.
    """
    from mlflow.entities.webhook import WebhookStatus

    hook_name = webhook_name(name)
    existing = [hook for hook in client.list_webhooks() if hook.name == hook_name]
    description = f"muco-flow promotion gate for '{name}' (muco_flow.registry.gate_server)"
    if existing:
        webhook = client.update_webhook(
            existing[0].webhook_id, url=url, events=[ALIAS_CREATED], secret=secret,
            description=description, status=WebhookStatus.ACTIVE,
        )  # fmt: skip
    else:
        webhook = client.create_webhook(hook_name, url, [ALIAS_CREATED], description=description, secret=secret)
    holder = version_by_alias(client, name, CHAMPION)
    if holder is not None:
        client.set_registered_model_tag(name, APPROVED_CHAMPION_TAG, holder.version)
    elif APPROVED_CHAMPION_TAG in client.get_registered_model(name).tags:
        client.delete_registered_model_tag(name, APPROVED_CHAMPION_TAG)
    show_eligibility(client, name, policy)
    return webhook
