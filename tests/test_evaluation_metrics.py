"""Metric functions on hand-made cases, and chunked scoring against brute force."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from muco_flow.evaluation.datasets import RetrievalSet
from muco_flow.evaluation.metrics import candidate_rank, hit_at_1, mrr, recall_at_k
from muco_flow.evaluation.retrieval import chunked_positive_ranks, chunked_top_k
from muco_flow.evaluation.scoring import chance_mmeb_average


def test_candidate_rank_hand_cases():
    assert candidate_rank(torch.tensor([0.9, 0.1, 0.5])) == 1  # correct first
    assert candidate_rank(torch.tensor([0.2, 0.9, 0.5, 0.1])) == 3  # two score higher
    assert candidate_rank(torch.tensor([0.5, 0.5, 0.1])) == 2  # a tie counts against the correct one
    assert candidate_rank(torch.tensor([0.7, 0.7, 0.7, 0.7])) == 4  # a collapsed model ranks it last
    assert candidate_rank(torch.tensor([0.3])) == 1  # a single candidate
    assert candidate_rank(torch.tensor([0.1, 0.9, 0.4]), correct=1) == 1


def test_hit_at_1_recall_and_mrr_hand_cases():
    assert hit_at_1([1, 3, 1, 2]) == 0.5
    assert hit_at_1([1]) == 1.0  # a dataset with a single query
    ranks = [[1], [4], [12], [2, 7]]
    assert recall_at_k(ranks, 1) == pytest.approx((1 + 0 + 0 + 0) / 4)
    assert recall_at_k(ranks, 5) == pytest.approx((1 + 1 + 0 + 1 / 2) / 4)  # 1 of 2 positives within min(5, 2)
    assert recall_at_k(ranks, 10) == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert mrr(ranks) == pytest.approx((1 + 1 / 4 + 1 / 12 + 1 / 2) / 4)
    assert mrr(ranks, cutoff=10) == pytest.approx((1 + 1 / 4 + 0 + 1 / 2) / 4)
    for metric in (hit_at_1, lambda r: recall_at_k(r, 1), mrr):
        with pytest.raises(ValueError, match="no queries"):
            metric([])


def brute_force_ranks(queries, pool, positives):
    scores = queries @ pool.T
    # itself included: 1 + (others within the tie tolerance or above)
    return [[int((scores[i] >= scores[i, p] - 1e-6).sum()) for p in pos] for i, pos in enumerate(positives)]


@pytest.mark.parametrize("query_chunk, pool_chunk", [(1, 1), (3, 7), (1000, 100000)])
def test_chunked_scoring_matches_brute_force(query_chunk, pool_chunk):
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(17, 8, generator=generator), dim=-1)
    pool = torch.nn.functional.normalize(torch.randn(53, 8, generator=generator), dim=-1)
    pool[10] = pool[3]  # an exact duplicate of a positive: a tie, counted against it
    positives = [[3], [5, 40], [10], *([i] for i in range(14))]
    got = chunked_positive_ranks(queries, pool, positives, query_chunk=query_chunk, pool_chunk=pool_chunk)
    assert got == brute_force_ranks(queries, pool, positives)
    # rows 3 and 10 are one vector: for any query they tie, and each counts the other against itself
    twin = chunked_positive_ranks(queries[:1], pool, [[3, 10]], query_chunk=query_chunk, pool_chunk=pool_chunk)
    assert twin[0][0] == twin[0][1] == got[0][0]
    scores, indices = chunked_top_k(queries, pool, 5, query_chunk=query_chunk, pool_chunk=pool_chunk)
    expected = (queries @ pool.T).topk(5, dim=1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(torch.gather(queries @ pool.T, 1, indices), expected.values)


def test_top_k_over_a_streamed_pool_matches_brute_force():
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(9, 6, generator=generator)
    pool = torch.randn(41, 6, generator=generator)
    expected = (queries @ pool.T).topk(7, dim=1)
    blocks = iter([pool[:5], pool[5:6], pool[6:30], pool[30:]])  # uneven, and consumed once
    scores, indices = chunked_top_k(queries, blocks, 7, query_chunk=4)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(indices, expected.indices)
    assert next(blocks, None) is None
    # fewer pool rows than k: every row, best first
    scores, indices = chunked_top_k(queries, (b for b in [pool[:2], pool[2:3]]), 7)
    assert indices.shape == (9, 3)
    torch.testing.assert_close(scores, (queries @ pool[:3].T).sort(dim=1, descending=True).values)


def test_chance_is_one_over_each_querys_own_list_and_a_query_without_one_is_refused():
    two_queries = RetrievalSet("A", "classification", Path("."), candidate_lists=[[0, 1], [0, 1, 2, 3]])
    one_query = RetrievalSet("B", "vqa", Path("."), candidate_lists=[[0, 1, 2, 3, 4]])
    # dataset A: (1/2 + 1/4) / 2 = 0.375; dataset B: 1/5; their mean: 0.2875
    assert chance_mmeb_average([two_queries, one_query]) == pytest.approx(0.2875)
    whole_pool = RetrievalSet("M3T-color", "color", Path("."), candidate_lists=[[0, 1], None])
    with pytest.raises(ValueError, match="M3T-color: a query without its own candidate list"):
        chance_mmeb_average([whole_pool])


def test_top_k_in_bfloat16_is_reranked_in_float32():
    # bfloat16 keeps 8 bits of mantissa: 1.0, 1.001 and 1.002 are all 1.0 in it, a three-way tie
    pool = torch.tensor([[1.0], [1.001], [0.5], [1.002]])
    queries = torch.tensor([[1.0], [-1.0]])
    scores, indices = chunked_top_k(queries, pool, 3, pool_chunk=2, dtype=torch.bfloat16, shortlist=2)
    # each block's two best in bfloat16, scored again in float32 and merged: the float32 order and scores
    assert indices.tolist() == [[3, 1, 0], [2, 0, 1]]
    assert scores.dtype == torch.float32
    assert scores.tolist() == [pool[[3, 1, 0], 0].tolist(), (-pool[[2, 0, 1], 0]).tolist()]
