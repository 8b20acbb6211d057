"""Scoring queries against a candidate pool in chunks.

Neither function ever holds a full queries x pool matrix: memory is bounded
by ``query_chunk x pool_chunk`` scores, whatever the pool's size.
"""

from __future__ import annotations

import torch

from muco_flow.evaluation.metrics import TIE_TOLERANCE


def chunked_top_k(
    queries: torch.Tensor, pool: torch.Tensor, k: int, *, query_chunk: int = 1024, pool_chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best pool rows per query by dot product: (scores, indices), best first."""
    k = min(k, pool.shape[0])
    all_scores, all_indices = [], []
    for q in range(0, queries.shape[0], query_chunk):
        block = queries[q : q + query_chunk]
        best_scores = torch.full((block.shape[0], 0), float("-inf"), dtype=block.dtype)
        best_indices = torch.empty((block.shape[0], 0), dtype=torch.long)
        for p in range(0, pool.shape[0], pool_chunk):
            scores = block @ pool[p : p + pool_chunk].T
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, top.values], dim=1)
            merged_indices = torch.cat([best_indices, top.indices + p], dim=1)
            keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_scores, best_indices = keep.values, merged_indices.gather(1, keep.indices)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def chunked_positive_ranks(
    queries: torch.Tensor,
    pool: torch.Tensor,
    positives: list[list[int]],
    *,
    query_chunk: int = 1024,
    pool_chunk: int = 65536,
) -> list[list[int]]:
    """The 1-based rank of each positive of each query in the whole pool.

    A tie counts against the positive: its rank is 1 + the number of other
    pool rows scoring at least as high (within TIE_TOLERANCE). A model that gives every candidate the
    same vector then ranks its positives last, not first.
    """
    ranks: list[list[int]] = []
    for q in range(0, queries.shape[0], query_chunk):
        block = queries[q : q + query_chunk]
        block_positives = positives[q : q + query_chunk]
        rows = torch.tensor([i for i, pos in enumerate(block_positives) for _ in pos], dtype=torch.long)
        cols = torch.tensor([p for pos in block_positives for p in pos], dtype=torch.long)
        if rows.numel() == 0:
            ranks.extend([] for _ in block_positives)
            continue
        positive_scores = (block[rows] * pool[cols]).sum(dim=1)
        others_at_least = torch.zeros(rows.shape[0], dtype=torch.long)
        for p in range(0, pool.shape[0], pool_chunk):
            scores = block @ pool[p : p + pool_chunk].T
            hits = scores[rows] >= positive_scores[:, None] - TIE_TOLERANCE
            # the positive's own column is not an "other" row, whatever rounding says
            own = ((cols >= p) & (cols < p + scores.shape[1])).nonzero().squeeze(1)
            hits[own, cols[own] - p] = False
            others_at_least += hits.sum(dim=1)
        flat = (others_at_least + 1).tolist()
        it = iter(flat)
        ranks.extend([next(it) for _ in pos] for pos in block_positives)
    return ranks
