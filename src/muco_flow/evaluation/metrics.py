"""Retrieval metrics from scores and ranks. A rank is 1-based.

MMEB's headline hit@1 is VLM2Vec's: the argmax of the query's own candidate
list, the correct one first, so a tie goes to it (TIGER-AI-Lab/VLM2Vec branch
v1, eval.py lines 157-167 and evaluation/eval_utils.py lines 6-17). The
stricter ranks here count ties against the correct item; scores within
TIE_TOLERANCE are ties, since the same two vectors can score a few ulps apart
depending on which kernel computed the product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TIE_TOLERANCE = 1e-6


def argmax_hit(scores: torch.Tensor) -> bool:
    """VLM2Vec's hit: the first highest-scoring candidate is candidate 0 (the correct one)."""
    return int(torch.argmax(scores)) == 0


def candidate_rank(scores: torch.Tensor, correct: int = 0) -> int:
    """Rank of candidate ``correct`` among ``scores``: 1 + the others scoring at least as high."""
    others = torch.cat([scores[:correct], scores[correct + 1 :]])
    return 1 + int((others >= scores[correct] - TIE_TOLERANCE).sum())


def hit_at_1(ranks: Sequence[int]) -> float:
    """MMEB's metric: the share of queries whose correct candidate ranks first."""
    if not ranks:
        raise ValueError("hit@1 of no queries")
    return sum(r == 1 for r in ranks) / len(ranks)


def recall_at_k(positive_ranks: Sequence[Sequence[int]], k: int) -> float:
    """Mean over queries of |positives in the top k| / min(k, |positives|)."""
    if not positive_ranks:
        raise ValueError("recall of no queries")
    return sum(sum(r <= k for r in ranks) / min(k, len(ranks)) for ranks in positive_ranks) / len(positive_ranks)


def mrr(positive_ranks: Sequence[Sequence[int]], cutoff: int | None = None) -> float:
    """Mean reciprocal rank of each query's best-ranked positive (0 beyond ``cutoff``)."""
    if not positive_ranks:
        raise ValueError("MRR of no queries")
    total = 0.0
    for ranks in positive_ranks:
        best = min(ranks)
        total += 0.0 if cutoff is not None and best > cutoff else 1.0 / best
    return total / len(positive_ranks)


def any_hit_recall_at_k(positive_ranks: Sequence[Sequence[int]], k: int) -> float:
    """UniIR's recall@k: the share of queries with any positive in the top k.

    A query whose positives are all absent from the pool (no ranks) is a miss
    that still counts in the denominator, as in UniIR.
    """
    if not positive_ranks:
        raise ValueError("recall of no queries")
    return sum(bool(ranks) and min(ranks) <= k for ranks in positive_ranks) / len(positive_ranks)
