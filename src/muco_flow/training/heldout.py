"""Evaluation during training: a held-out slice of the training data, scored as retrieval, and the best checkpoint.

The slice is ``training.during_training.heldout_conversations`` records of
the stage's own data (stage 1: M3T images with all their turns; stage 2:
MMEB-train samples), drawn once with a fixed seed (``heldout_records``) and
left out of every epoch (training/data.py). It is never the MMEB, M-BEIR or
held-out M3T evaluation sets: selecting a checkpoint on those would select on
the test sets.

Every query turn of the slice is ranked against the slice's distinct targets
(by target key: text, and in stage 2 image), ties counted against it, with
the evaluation's own ranking and metrics (evaluation/retrieval.py,
evaluation/metrics.py). ``HELDOUT_METRIC``, hit@1 over every query turn, is
what ``training.select: best`` maximises; ``Selection`` keeps the best
checkpoint so far, in the checkpoint's client state, so a resumed run keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from muco_flow.evaluation.metrics import hit_at_1, mrr, recall_at_k
from muco_flow.evaluation.retrieval import chunked_positive_ranks

# The seed of the held-out draw: fixed, so every training seed and every resume holds out the same records
HELDOUT_SEED = 20260226
# The metric ``training.select: best`` maximises, as logged (MLflow, metrics.jsonl)
HELDOUT_METRIC = "heldout/hit_at_1"
# The key of the best checkpoint so far in a checkpoint's client state
SELECTION_STATE = "heldout_selection"


def heldout_records(records: int, count: int) -> np.ndarray:
    """The ``count`` records of ``records`` that are held out, as sorted indices: a fixed draw.

    The first ``count`` of one fixed permutation, so a smaller slice is part of a larger one.
    """
    if count and count >= records:
        raise ValueError(
            f"training.during_training.heldout_conversations is {count}, but the data has {records} records: "
            "hold out fewer, leaving some to train on"
        )
    return np.sort(np.random.default_rng(HELDOUT_SEED).permutation(records)[:count])


def heldout_scores(
    queries: torch.Tensor, targets: torch.Tensor, target_keys: Sequence[int], turn_types: Sequence[int]
) -> dict[str, float]:
    """Each query (row i) against the distinct targets of the slice, its own target ``targets[i]`` correct.

    Targets with the same key are one candidate (encoded as the first one), so
    a query whose target text recurs is not penalised for its twin.
    Returns hit@1 over every query, recall@5 and MRR@10 (evaluation/metrics.py),
    and hit@1 averaged over the turn types (``turn_types``: each query's; each
    type counts once, as the held-out M3T evaluation reports each type), under ``heldout/``.
    """
    keys = [int(key) for key in target_keys]
    first: dict[int, int] = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    candidate = {key: index for index, key in enumerate(first)}
    pool = targets[list(first.values())]
    ranks = chunked_positive_ranks(queries, pool, [[candidate[key]] for key in keys])
    by_type: dict[int, list[int]] = {}
    for (rank,), kind in zip(ranks, turn_types, strict=True):
        by_type.setdefault(int(kind), []).append(rank)
    return {
        HELDOUT_METRIC: hit_at_1([r for (r,) in ranks]),
        "heldout/hit_at_1_turn_mean": sum(hit_at_1(r) for r in by_type.values()) / len(by_type),
        "heldout/recall_at_5": recall_at_k(ranks, 5),
        "heldout/mrr_at_10": mrr(ranks, cutoff=10),
    }


def embed_heldout(
    embed: Callable[[dict[str, torch.Tensor]], torch.Tensor], batches: Iterable[Any], *, four_way: bool
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """The slice's query and target embeddings, target keys and turn types, row i of each one pair.

    ``batches``: ``ConversationBatches.heldout_batches`` (training/data.py's Batch, which imports this module).
    ``embed``: one side's model inputs to its ``<|emb|>`` vectors (the training
    model, in eval mode). Stage 2 (``four_way``) keeps each sample's main
    embedding, as evaluation encodes it: rows hold [main, auxiliary] pairs.
    """
    queries, targets, keys, types = [], [], [], []
    with torch.no_grad():
        for batch in batches:
            query, target, target_keys = embed(batch.query), embed(batch.target), batch.target_keys
            turn_types = batch.turn_types
            if four_way:
                query, target, target_keys, turn_types = query[0::2], target[0::2], target_keys[0::2], turn_types[0::2]
            queries.append(query.float().cpu())
            targets.append(target.float().cpu())
            keys.extend(target_keys.tolist())
            types.extend(turn_types.tolist())
    return torch.cat(queries), torch.cat(targets), keys, types


def evaluate_heldout(model: Any, batches: Iterable[Any], device: torch.device, *, four_way: bool) -> dict[str, float]:
    """The held-out metrics of ``model`` (the embedder being trained), in eval mode; its mode is restored.

    Eval mode turns dropout off, so no random number is drawn and the training
    continues exactly as it would have without the evaluation.
    """

    def embed(side: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**{name: value.to(device) for name, value in side.items()})

    was_training = model.training
    model.eval()
    try:
        queries, targets, keys, types = embed_heldout(embed, batches, four_way=four_way)
    finally:
        model.train(was_training)
    return heldout_scores(queries, targets, keys, types)


@dataclass(frozen=True)
class Selection:
    """The best evaluated checkpoint so far: its step and ``HELDOUT_METRIC`` (None: none evaluated yet)."""

    step: int | None = None
    value: float | None = None

    def after(self, step: int, metrics: Mapping[str, float]) -> Selection:
        """The best after checkpoint ``step`` scored ``metrics``: a tie keeps the earlier checkpoint."""
        value = metrics[HELDOUT_METRIC]
        if self.value is None or value > self.value:
            return Selection(step, value)
        return self

    def state(self) -> dict[str, Any]:
        """As a checkpoint's client state holds it."""
        return asdict(self)

    @classmethod
    def from_state(cls, client_state: Mapping[str, Any]) -> Selection:
        """The selection a checkpoint's client state holds (none: a checkpoint before any evaluation)."""
        saved = client_state.get(SELECTION_STATE) or {}
        return cls(saved.get("step"), saved.get("value"))

    def describe(self, select: str, final_step: int) -> dict[str, Any]:
        """Which step's weights became the model and why: train_run.json's ``selected``."""
        if select == "best" and self.step is not None:
            reason = f"the highest {HELDOUT_METRIC} of the evaluated checkpoints ({self.value:.4f})"
            return {"select": select, "step": self.step, "metric": HELDOUT_METRIC, "value": self.value,
                    "reason": reason}  # fmt: skip
        return {"select": select, "step": final_step, "reason": "the last step's weights (training.select: last)"}
