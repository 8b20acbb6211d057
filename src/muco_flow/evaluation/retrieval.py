"""Scoring queries against a candidate pool in chunks, on several ranks by sharing out the queries.

Neither function ever holds a full queries x pool matrix: memory is bounded
by ``query_chunk x pool_chunk`` scores, whatever the pool's size. Both also
take the pool as blocks (a stream for top-k, a pool of evaluation.encoded_pool
for ranks), read once, so that the pool itself need not fit.

A query's ranks depend on that query and the pool only, so ranks of a
multi-process evaluation each score a contiguous share of the queries
against every pool block (``QueryShare``), on their own device, and the
shares are gathered back in query order: the same ranks as one process
computes, for 1/n of the scoring work per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from muco_flow.evaluation.encoded_pool import InMemoryPool, VectorPool
from muco_flow.evaluation.metrics import TIE_TOLERANCE

T = TypeVar("T")


@dataclass(frozen=True)
class QueryShare:
    """Which queries this rank scores (rank r of n: the r-th of n contiguous parts) and on which device.

    ``gather`` is a collective every rank calls with its part's results and
    that returns every rank's, in rank order (torch.distributed's
    all_gather_object); one rank needs none.
    """

    rank: int = 0
    ranks: int = 1
    gather: Callable[[Any], list[Any]] | None = None
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.ranks:
            raise ValueError(f"rank {self.rank} of {self.ranks}")
        if self.ranks > 1 and self.gather is None:
            raise ValueError("scoring shared over several ranks needs a gather")

    def part(self, count: int) -> slice:
        """This rank's queries of ``count``: parts differ in size by one at most, in rank order."""
        return slice(self.rank * count // self.ranks, (self.rank + 1) * count // self.ranks)

    def merged(self, mine: list[T]) -> list[T]:
        """Every rank's results (each one per query of its ``part``), in query order."""
        if self.ranks == 1:
            return mine
        assert self.gather is not None  # __post_init__ refuses several ranks without one
        parts = self.gather(mine)
        if len(parts) != self.ranks:
            raise RuntimeError(f"gathered {len(parts)} parts from {self.ranks} ranks")
        return [result for part in parts for result in part]


def chunked_top_k(
    queries: torch.Tensor,
    pool: torch.Tensor | Iterable[torch.Tensor],
    k: int,
    *,
    query_chunk: int = 1024,
    pool_chunk: int = 65536,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    shortlist: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best pool rows per query by dot product: (scores, indices), best first.

    ``pool`` is a tensor, or an iterable of row blocks in pool order (read
    from disk or encoded on the fly), consumed once; then only one block of
    the pool is in memory at a time, and the blocks' own sizes replace ``pool_chunk``.
    Scores and top-k run on ``device`` (default: the queries'), where the results are.

    With a ``dtype`` below float32 (a model's bf16: a GPU's products run
    several times faster in it), each block's scores are computed in it, and
    each query's ``shortlist`` best of the block (default 4k) are scored again
    in float32: the scores returned are exact, and the order is exact among
    the short lists (a row that the low precision puts below a block's
    ``shortlist`` others is not seen).
    """
    blocks = (pool[p : p + pool_chunk] for p in range(0, pool.shape[0], pool_chunk)) if torch.is_tensor(pool) else pool
    device = device or queries.device
    queries = queries.to(device)
    low_queries = queries.to(dtype)
    shortlist = max(k, shortlist or 4 * k)
    starts = range(0, queries.shape[0], query_chunk)
    sizes = [min(query_chunk, queries.shape[0] - q) for q in starts]
    best = [(queries.new_empty(n, 0), torch.empty(n, 0, dtype=torch.long, device=device)) for n in sizes]
    offset = 0
    for block in blocks:
        block = block.to(device)
        low_block = block.to(dtype)
        for i, q in enumerate(starts):
            chunk = slice(q, q + query_chunk)
            if dtype == torch.float32:  # the scores as the vectors give them, as before there was a dtype
                top = (queries[chunk] @ block.T).topk(min(k, block.shape[0]), dim=1)
                scores, indices = top.values, top.indices
            else:
                short = (low_queries[chunk] @ low_block.T).topk(min(shortlist, block.shape[0]), dim=1)
                # each query's short list gathered (query_chunk x shortlist x d numbers) and scored in float32
                exact = torch.einsum("qd,qsd->qs", queries[chunk].float(), block[short.indices].float())
                top = exact.topk(min(k, exact.shape[1]), dim=1)
                scores, indices = top.values, short.indices.gather(1, top.indices)
            best[i] = _merge_top_k(*best[i], scores, indices + offset, k)
        offset += block.shape[0]
        # the loop variables would keep this block alive while the stream makes the next one
        del block, low_block
    return torch.cat([scores for scores, _ in best]), torch.cat([indices for _, indices in best])


def _merge_top_k(
    best_scores: torch.Tensor, best_indices: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the best so far and of a block's best ``scores`` at pool rows ``indices``."""
    merged_scores = torch.cat([best_scores, scores], dim=1)
    merged_indices = torch.cat([best_indices, indices], dim=1)
    keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
    return keep.values, merged_indices.gather(1, keep.indices)


def chunked_positive_ranks(
    queries: torch.Tensor,
    pool: torch.Tensor | VectorPool,
    positives: list[list[int]],
    *,
    query_chunk: int = 1024,
    pool_chunk: int = 65536,
    ignore_other_positives: bool = False,
    device: torch.device | None = None,
) -> list[list[int]]:
    """The 1-based rank of each positive of each query in the whole pool.

    A tie counts against the positive: its rank is 1 + the number of other
    pool rows scoring at least as high (within TIE_TOLERANCE). A model that gives every candidate the
    same vector then ranks its positives last, not first. With
    ``ignore_other_positives`` only the query's non-positive rows count, so
    positives never push each other down (UniIR's any-positive recall needs
    just the best one's rank).

    ``pool`` is a tensor (read ``pool_chunk`` rows at a time) or a pool in
    memory or on disk (evaluation.encoded_pool), read once, a block at a time.
    The scores are computed on ``device`` (default: the queries'), each pool
    block moved there as it is read, in float32: a rank is a count of exact
    comparisons, which a lower precision would change.
    """
    if not positives:
        return []  # this rank's share of the queries is empty: nothing to read
    if torch.is_tensor(pool):
        pool = InMemoryPool(pool, pool_chunk)
    device = device or queries.device
    queries = queries.to(device)
    # per query chunk: its positives' (row, column) pairs and scores, and the pairs never counted
    chunks: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
    for q in range(0, queries.shape[0], query_chunk):
        block = queries[q : q + query_chunk]
        block_positives = positives[q : q + query_chunk]
        rows = torch.tensor([i for i, pos in enumerate(block_positives) for _ in pos], dtype=torch.long, device=device)
        cols = torch.tensor([p for pos in block_positives for p in pos], dtype=torch.long, device=device)
        if rows.numel() == 0:
            chunks.append(None)
            continue
        positive_scores = (block[rows] * pool.rows(cols.tolist()).to(device)).sum(dim=1)
        # (entry, column) pairs that never count against an entry: its own column,
        # whatever rounding says, and with ignore_other_positives its query's other positives
        if ignore_other_positives:
            pairs, entry = [], 0
            for pos in block_positives:
                pairs += [(entry + j, c) for j in range(len(pos)) for c in pos]
                entry += len(pos)
            skip_entries = torch.tensor([e for e, _ in pairs], dtype=torch.long, device=device)
            skip_cols = torch.tensor([c for _, c in pairs], dtype=torch.long, device=device)
        else:
            skip_entries, skip_cols = torch.arange(rows.shape[0], device=device), cols
        others_at_least = torch.zeros(rows.shape[0], dtype=torch.long, device=device)
        chunks.append((q, rows, positive_scores, skip_entries, skip_cols, others_at_least))
    p = 0
    for pool_block in pool.blocks():
        pool_block = pool_block.to(device)
        for chunk in chunks:
            if chunk is None:
                continue
            q, rows, positive_scores, skip_entries, skip_cols, others_at_least = chunk
            scores = queries[q : q + query_chunk] @ pool_block.T
            hits = scores[rows] >= positive_scores[:, None] - TIE_TOLERANCE
            inside = ((skip_cols >= p) & (skip_cols < p + scores.shape[1])).nonzero().squeeze(1)
            hits[skip_entries[inside], skip_cols[inside] - p] = False
            others_at_least += hits.sum(dim=1)
        p += pool_block.shape[0]
        # the loop variable would keep this block alive while the pool reads the next one
        del pool_block
    ranks: list[list[int]] = []
    for q, chunk in zip(range(0, queries.shape[0], query_chunk), chunks, strict=True):
        block_positives = positives[q : q + query_chunk]
        if chunk is None:
            ranks.extend([] for _ in block_positives)
            continue
        it = iter((chunk[-1] + 1).tolist())
        ranks.extend([next(it) for _ in pos] for pos in block_positives)
    return ranks
