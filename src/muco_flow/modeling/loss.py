"""MuCo's multi-turn contrastive loss.

Rows are sample-major: row ``b*K + k`` is sample b, turn k. On a rank with
index ``rank``, the local queries are ``[B*K, d]`` and the targets are gathered
from all ranks, ``[world*B*K, d]``, rank blocks in rank order. The positive of
local query (b, k) is target (b, k) in this rank's block. The other K-1
targets of the same sample are true statements about the same image, so they
are masked out instead of being used as negatives; every other sample's target
is a negative. K = 1 is the single-turn (VLM2Vec-style) loss.

Short answers repeat across samples ("red", "three"). With ``target_keys``
(one id per target text), a target with the same text as the positive is
masked out too: encoded on its own, as evaluation encodes it, an answer embeds
the same wherever it comes from, so it cannot be its twin's negative.

``four_way_contrastive_loss`` is MuCo's second-stage (MMEB fine-tuning)
loss: one turn per sample, and each side has a main and an auxiliary
embedding, so queries and targets meet in four combinations. With
``target_keys`` it masks repeated targets the same way (K = 1), keyed by text
and image, in all four terms and among the hard negatives.

``matryoshka_loss`` wraps either loss for Matryoshka representation
learning: the loss of each nested prefix of the embeddings, weighted and
summed (training.matryoshka).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from muco_flow.modeling.matryoshka import dimensions_problem, nested_prefix

DEFAULT_TEMPERATURE = 0.02


def _not_negative_mask(
    rows: int, columns: int, turns: int, offset: int, device: torch.device, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """True where column ``j`` may not be a negative of row ``i`` (whose positive is column ``offset + i``).

    That is another turn of the same sample, or, with ``keys`` (one per
    column), a column whose key equals the positive's.
    """
    positive = torch.arange(rows, device=device) + offset
    masked = (positive // turns)[:, None] == (torch.arange(columns, device=device) // turns)[None, :]
    if keys is not None:
        masked |= keys[positive][:, None] == keys[None, :]
    masked[torch.arange(rows, device=device), positive] = False  # keep the positive
    return masked


def _info_nce(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    turns: int,
    offset: int,
    temperature: float,
    keys: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    extra_offset: int = 0,
    extra_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each anchor against all candidates; the positive is column ``offset + i``."""
    rows = anchors.shape[0]
    logits = anchors @ candidates.T / temperature
    logits = logits.masked_fill(
        _not_negative_mask(rows, candidates.shape[0], turns, offset, anchors.device, keys), float("-inf")
    )
    if extra is not None:
        # Hard negatives: the anchor's own turn's negative, and any of other samples.
        extra_logits = anchors @ extra.T / temperature
        extra_same = _not_negative_mask(rows, extra.shape[0], turns, extra_offset, anchors.device)
        if keys is not None and extra_keys is not None:
            # a "wrong" answer with the positive's text is no negative either
            positive = torch.arange(rows, device=anchors.device) + offset
            extra_same = extra_same | (keys[positive][:, None] == extra_keys[None, :])
        logits = torch.cat([logits, extra_logits.masked_fill(extra_same, float("-inf"))], dim=1)
    labels = torch.arange(rows, device=anchors.device) + offset
    return F.cross_entropy(logits, labels)


def multi_turn_contrastive_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    turns: int,
    temperature: float = DEFAULT_TEMPERATURE,
    rank: int = 0,
    *,
    gathered_query: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
    target_keys: torch.Tensor | None = None,
    negative_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of local queries against gathered targets, same-sample turns masked.

    Args:
        query: this rank's query embeddings, [B*K, d], L2-normalised.
        target: all ranks' target embeddings, [world*B*K, d].
        turns: K, the turns per sample.
        temperature: the softmax temperature (MuCo uses 0.02).
        rank: this rank's index, which places its block inside ``target``.
        gathered_query: all ranks' queries [world*B*K, d]; when given, the
            symmetric target->query term is added and the two are averaged.
        hard_negatives: embeddings of wrong answers (M3T's ``neg_text``),
            sample-major like ``target``, appended as extra columns. Query
            (b, k) keeps its own turn's negative and every other sample's;
            the negatives of the other turns of its sample are masked, as
            those turns' targets are.
        target_keys: one integer per row of ``target`` that is equal for equal
            target texts; targets equal to a query's positive are then not
            its negatives (nor, in the symmetric term, their queries).
        negative_keys: the same ids for the rows of ``hard_negatives``; with
            ``target_keys``, a hard negative with the positive's text is masked.
    """
    local = query.shape[0]
    if local % turns or target.shape[0] % local:
        raise ValueError(
            f"shapes do not fit K={turns}: query has {local} rows, target {target.shape[0]} "
            "(expected B*K and world*B*K)"
        )
    if target_keys is not None and target_keys.shape != (target.shape[0],):
        raise ValueError(f"target_keys must have shape ({target.shape[0]},), got {tuple(target_keys.shape)}")
    if target.shape[0] < (rank + 1) * local:
        raise ValueError(f"rank {rank} has no block in a target of {target.shape[0]} rows ({local} per rank)")
    offset = rank * local
    # hard negatives may be this rank's [B*K] or gathered like the targets
    negative_offset = offset
    if hard_negatives is not None:
        if hard_negatives.shape[0] not in (local, target.shape[0]):
            raise ValueError(
                f"hard_negatives must have {local} or {target.shape[0]} rows, got {hard_negatives.shape[0]}"
            )
        negative_offset = 0 if hard_negatives.shape[0] == local else offset
        if negative_keys is not None and negative_keys.shape != (hard_negatives.shape[0],):
            raise ValueError(
                f"negative_keys must have shape ({hard_negatives.shape[0]},), got {tuple(negative_keys.shape)}"
            )
    loss = _info_nce(
        query, target, turns, offset, temperature, target_keys, hard_negatives, negative_offset, negative_keys
    )
    if gathered_query is None:
        return loss
    if gathered_query.shape != target.shape:
        raise ValueError(f"gathered_query must have the target's shape {tuple(target.shape)}")
    own_targets = target[offset : offset + local]
    # a query is keyed by its positive's text, so the same keys mask this direction
    return (loss + _info_nce(own_targets, gathered_query, turns, offset, temperature, target_keys)) / 2


@dataclass(frozen=True)
class FourWayLoss:
    """The four-way loss and its terms, each a cross-entropy averaged over this rank's queries."""

    query_target: torch.Tensor
    query_target_aux: torch.Tensor
    query_aux_target: torch.Tensor
    query_aux_target_aux: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.query_target + self.query_target_aux + self.query_aux_target + self.query_aux_target_aux

    def terms(self) -> dict[str, torch.Tensor]:
        """The terms by name, e.g. for logging as ``loss/<name>``."""
        return {
            "query_target": self.query_target,
            "query_target_aux": self.query_target_aux,
            "query_aux_target": self.query_aux_target,
            "query_aux_target_aux": self.query_aux_target_aux,
        }


def four_way_contrastive_loss(
    query: torch.Tensor,
    query_aux: torch.Tensor,
    target: torch.Tensor,
    target_aux: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    rank: int = 0,
    *,
    hard_negatives: torch.Tensor | None = None,
    target_keys: torch.Tensor | None = None,
    negative_keys: torch.Tensor | None = None,
) -> FourWayLoss:
    """MuCo's stage-2 InfoNCE: both query embeddings against both target embeddings.

    Args:
        query, query_aux: this rank's main and auxiliary query embeddings, [B, d].
        target, target_aux: all ranks' main and auxiliary target embeddings,
            [world*B, d], rank blocks in rank order; local query i's positive
            is row ``rank*B + i``.
        temperature: the softmax temperature (MuCo uses 0.02).
        rank: this rank's index, which places its block inside the targets.
        hard_negatives: embeddings of wrong targets, [n, d] (all ranks'
            negatives, gathered like the targets). Every row is a negative of
            every query: the terms against ``target`` and ``target_aux``
            append the main query's similarities to them, the terms of
            ``query_aux`` the auxiliary query's, as MuCo pairs them.
        target_keys: one integer per target row, [world*B], equal for equal
            targets (text and image): a target equal to a query's positive is
            not its negative, in the main and in the auxiliary columns alike
            (the auxiliary embedding is the same target's). None: MuCo's
            loss, every target but the positive is a negative.
        negative_keys: the same ids for the rows of ``hard_negatives``; with
            ``target_keys``, a hard negative equal to the positive is masked.

    One turn per sample means no same-sample masking. ``.total`` is the sum of the four terms.
    """
    if query.ndim != 2 or query_aux.shape != query.shape:
        raise ValueError(
            f"query and query_aux must both be [B, d]; got {tuple(query.shape)} and {tuple(query_aux.shape)}"
        )
    if target.ndim != 2 or target_aux.shape != target.shape:
        raise ValueError(
            f"target and target_aux must both be [world*B, d]; got {tuple(target.shape)} and {tuple(target_aux.shape)}"
        )
    local, dim = query.shape
    if target.shape[1] != dim or target.shape[0] % local:
        raise ValueError(
            f"target {tuple(target.shape)} does not fit query {tuple(query.shape)}: expected [world*{local}, {dim}]"
        )
    if target.shape[0] < (rank + 1) * local:
        raise ValueError(f"rank {rank} has no block in a target of {target.shape[0]} rows ({local} per rank)")
    if hard_negatives is not None and (hard_negatives.ndim != 2 or hard_negatives.shape[1] != dim):
        raise ValueError(f"hard_negatives must be [n, {dim}], got {tuple(hard_negatives.shape)}")
    if target_keys is not None and target_keys.shape != (target.shape[0],):
        raise ValueError(f"target_keys must have shape ({target.shape[0]},), got {tuple(target_keys.shape)}")
    if negative_keys is not None and (hard_negatives is None or negative_keys.shape != (hard_negatives.shape[0],)):
        raise ValueError("negative_keys must have one key per row of hard_negatives")
    offset = rank * local
    labels = torch.arange(local, device=query.device) + offset
    # one turn per sample: only the repeats of the positive are masked, the same in all four terms
    masked = None
    if target_keys is not None:
        masked = _not_negative_mask(local, target.shape[0], 1, offset, query.device, target_keys)
        if hard_negatives is not None:
            repeats = torch.zeros(local, hard_negatives.shape[0], dtype=torch.bool, device=query.device)
            if negative_keys is not None:
                repeats = target_keys[labels][:, None] == negative_keys[None, :]
            masked = torch.cat([masked, repeats], dim=1)

    def term(anchors: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        if hard_negatives is not None:
            candidates = torch.cat([candidates, hard_negatives])
        logits = anchors @ candidates.T / temperature
        if masked is not None:
            logits = logits.masked_fill(masked, float("-inf"))
        return F.cross_entropy(logits, labels)

    return FourWayLoss(
        query_target=term(query, target),
        query_target_aux=term(query, target_aux),
        query_aux_target=term(query_aux, target),
        query_aux_target_aux=term(query_aux, target_aux),
    )


# a loss over a list of embedding tensors, and its terms to log (GradCache's LossFunction)
TermedLoss = Callable[[list[torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def matryoshka_loss(
    loss: TermedLoss,
    embeddings: Sequence[torch.Tensor],
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Matryoshka representation learning: ``sum_d weights[d] * loss(prefixes of width d)``.

    Every tensor of ``embeddings`` (rows of L2-normalised vectors) is cut to
    its first ``d`` coordinates and re-normalised (``nested_prefix``) for each
    ``d`` of ``dims``, and ``loss`` runs on those prefixes; the result is the
    weighted sum, as in Kusupati et al. (2022, eq. 1: the sum over nested
    dimensions of c_m times the loss) and sentence-transformers'
    ``MatryoshkaLoss`` (weights default to 1 each, so equal weights are a sum,
    not a mean). The terms are each width's loss, ``matryoshka_at_<d>``, and
    ``loss``'s own terms per width, ``<name>_at_<d>`` (MLflow refuses ``@`` in a name).

    ``loss`` is called once per width with the cut embeddings, so whatever it
    does with them (an all-gather across ranks) happens on the prefixes, and
    the whole is one differentiable function of ``embeddings``: GradCache
    (training/grad_cache.py) takes it as it takes the plain loss.
    """
    problem = dimensions_problem(list(dims), embeddings[0].shape[-1] if embeddings else None)
    if problem:
        raise ValueError(f"matryoshka dims {problem}")
    weights = [1.0] * len(dims) if weights is None else list(weights)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka weights must have one weight per dimension ({len(dims)}), got {len(weights)}")
    total: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = {}
    for dim, weight in zip(dims, weights, strict=True):
        value, inner = loss([nested_prefix(e, dim) for e in embeddings])
        terms[f"matryoshka_at_{dim}"] = value
        terms |= {f"{name}_at_{dim}": term for name, term in inner.items()}
        total = weight * value if total is None else total + weight * value
    assert total is not None  # dims is not empty (dimensions_problem)
    return total, terms
