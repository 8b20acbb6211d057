"""The stage-1 and stage-2 losses against slow references, hand-computed cases, and 2 gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from muco_flow.modeling.loss import four_way_contrastive_loss, multi_turn_contrastive_loss
from muco_flow.training.distributed import all_gather_with_grad
from tests.servers import free_port


def reference_loss(query, target, turns, temperature, rank, negatives=None, keys=None, negative_keys=None):
    """InfoNCE written pair by pair: for each query, a positive over every allowed column."""
    local = query.shape[0]
    total = 0.0
    for i in range(local):
        me = rank * local + i  # this query's positive column, and its global row
        logits = []
        positive = None
        for j in range(target.shape[0]):
            if j // turns == me // turns and j != me:
                continue  # another turn of the same sample: neither positive nor negative
            if keys is not None and keys[j] == keys[me] and j != me:
                continue  # the same answer text as the positive: not a negative either
            value = float(query[i] @ target[j]) / temperature
            logits.append(value)
            if j == me:
                positive = value
        if negatives is not None:
            base = rank * local if negatives.shape[0] == target.shape[0] else 0
            for j in range(negatives.shape[0]):
                if j // turns == (base + i) // turns and j != base + i:
                    continue  # another turn's wrong answer about the same image
                if keys is not None and negative_keys is not None and negative_keys[j] == keys[me]:
                    continue  # a wrong answer with the positive's text
                logits.append(float(query[i] @ negatives[j]) / temperature)
        top = max(logits)
        total += -(positive - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / local


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("batch, turns, world, rank", [(3, 7, 1, 0), (2, 3, 3, 1), (4, 1, 2, 1), (1, 7, 2, 0)])
@pytest.mark.parametrize("temperature", [0.02, 0.5])
def test_matches_the_pairwise_reference(batch, turns, world, rank, temperature):
    query = unit(batch * turns, 16, seed=1)
    target = unit(world * batch * turns, 16, seed=2)
    got = multi_turn_contrastive_loss(query, target, turns, temperature, rank)
    assert got.item() == pytest.approx(reference_loss(query, target, turns, temperature, rank), rel=1e-9)


@pytest.mark.parametrize("rank", [0, 1])
def test_hard_negatives_match_the_reference(rank):
    query, target = unit(6, 8, seed=3), unit(12, 8, seed=4)
    for negatives in (unit(6, 8, seed=5), unit(12, 8, seed=6)):
        got = multi_turn_contrastive_loss(query, target, 3, 0.1, rank, hard_negatives=negatives)
        assert got.item() == pytest.approx(reference_loss(query, target, 3, 0.1, rank, negatives), rel=1e-9)
        # more columns in the softmax denominator: the loss can only grow
        assert got.item() > multi_turn_contrastive_loss(query, target, 3, 0.1, rank).item()


@pytest.mark.parametrize("rank", [0, 1])
def test_hard_negatives_with_the_positive_text_are_masked(rank):
    query, target, negatives = unit(6, 8, seed=21), unit(12, 8, seed=22), unit(12, 8, seed=23)
    keys = torch.tensor([5, 1, 2, 5, 3, 1, 7, 5, 2, 9, 1, 4])
    negative_keys = torch.tensor([1, 6, 5, 8, 2, 9, 5, 3, 3, 7, 0, 4])
    got = multi_turn_contrastive_loss(
        query, target, 3, 0.1, rank, hard_negatives=negatives, target_keys=keys, negative_keys=negative_keys
    )
    expected = reference_loss(query, target, 3, 0.1, rank, negatives, keys=keys, negative_keys=negative_keys)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    unkeyed = multi_turn_contrastive_loss(query, target, 3, 0.1, rank, hard_negatives=negatives, target_keys=keys)
    assert got.item() < unkeyed.item()


def test_hard_negatives_hand_computed():
    eye = torch.eye(2, dtype=torch.float64)
    # two one-turn samples, each one's negative equal to its positive: row 0's
    # logits are [1, 0 | 1, 0], so -log(e / (2e + 2)) = log(2 + 2/e)
    got = multi_turn_contrastive_loss(eye, eye, 1, 1.0, hard_negatives=eye)
    assert got.item() == pytest.approx(math.log(2 + 2 / math.e))
    # one sample, two turns: the other turn's target and the other turn's
    # negative are masked, the turn's own negative stays: logits [1 | 1], log 2
    got = multi_turn_contrastive_loss(eye, eye, 2, 1.0, hard_negatives=eye)
    assert got.item() == pytest.approx(math.log(2))
    # at rank 1 of 2 the local rows' negatives are the second block of the gathered ones
    other = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    gathered = torch.cat([other, eye])
    got = multi_turn_contrastive_loss(eye, gathered, 2, 1.0, rank=1, hard_negatives=gathered)
    # row 0 (e1): targets [0, 1 | 1, masked], negatives [0, 1 | 1, masked]: -log(e / (2 + 4e))
    # row 1 (e2): targets [1, 0 | masked, 1], negatives [1, 0 | masked, 1]: the same
    assert got.item() == pytest.approx(math.log((2 + 4 * math.e) / math.e))


def test_hand_computed_cases():
    eye = torch.eye(2, dtype=torch.float64)
    # two samples, one turn each, orthogonal: -log(e / (e + 1)) = log(1 + 1/e)
    assert multi_turn_contrastive_loss(eye, eye, 1, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # one sample, two turns: the only other column is the same sample's, masked, so the loss is 0
    assert multi_turn_contrastive_loss(eye, eye, 2, 1.0).item() == pytest.approx(0.0, abs=1e-12)
    # unmasked, that column would be a negative: log(1 + 1/e) for each query
    assert multi_turn_contrastive_loss(eye, eye, 1, 1.0).item() > 0.3


def test_symmetric_term_averages_both_directions():
    query, target = unit(4, 8, seed=7), unit(8, 8, seed=8)
    all_queries = torch.cat([unit(4, 8, seed=9), query])  # rank 1's block is ours
    got = multi_turn_contrastive_loss(query, target, 2, 0.05, rank=1, gathered_query=all_queries)
    forward = reference_loss(query, target, 2, 0.05, 1)
    backward = reference_loss(target[4:], all_queries, 2, 0.05, 1)
    assert got.item() == pytest.approx((forward + backward) / 2, rel=1e-9)


@pytest.mark.parametrize("rank", [0, 1])
def test_targets_with_the_positive_text_are_not_negatives(rank):
    query, target = unit(6, 8, seed=11), unit(12, 8, seed=12)
    keys = torch.tensor([5, 1, 2, 5, 3, 1, 7, 5, 2, 9, 1, 4])  # repeats across samples and ranks
    got = multi_turn_contrastive_loss(query, target, 3, 0.1, rank, target_keys=keys)
    assert got.item() == pytest.approx(reference_loss(query, target, 3, 0.1, rank, keys=keys), rel=1e-9)
    # distinct keys change nothing; repeated keys remove negatives, so the loss drops
    distinct = multi_turn_contrastive_loss(query, target, 3, 0.1, rank, target_keys=torch.arange(12))
    plain = multi_turn_contrastive_loss(query, target, 3, 0.1, rank)
    assert distinct.item() == pytest.approx(plain.item(), rel=1e-12)
    assert got.item() < plain.item()


def test_duplicate_answers_hand_computed():
    # two one-turn samples with the same answer text: the other one is no
    # longer a negative, so each query's softmax has only its positive
    eye = torch.eye(2, dtype=torch.float64)
    same = torch.tensor([4, 4])
    assert multi_turn_contrastive_loss(eye, eye, 1, 1.0, target_keys=same).item() == pytest.approx(0.0, abs=1e-12)
    symmetric = multi_turn_contrastive_loss(eye, eye, 1, 1.0, gathered_query=eye, target_keys=same)
    assert symmetric.item() == pytest.approx(0.0, abs=1e-12)


def test_symmetric_term_masks_queries_of_equal_answers():
    query, target = unit(4, 8, seed=13), unit(8, 8, seed=14)
    all_queries = torch.cat([unit(4, 8, seed=15), query])
    keys = torch.tensor([1, 2, 3, 1, 2, 6, 1, 8])
    got = multi_turn_contrastive_loss(query, target, 2, 0.05, rank=1, gathered_query=all_queries, target_keys=keys)
    forward = reference_loss(query, target, 2, 0.05, 1, keys=keys)
    backward = reference_loss(target[4:], all_queries, 2, 0.05, 1, keys=keys)
    assert got.item() == pytest.approx((forward + backward) / 2, rel=1e-9)


def test_shapes_that_do_not_fit_are_named():
    with pytest.raises(ValueError, match="do not fit K=3"):
        multi_turn_contrastive_loss(unit(4, 8, seed=1), unit(8, 8, seed=2), 3)
    with pytest.raises(ValueError, match="rank 2 has no block"):
        multi_turn_contrastive_loss(unit(4, 8, seed=1), unit(8, 8, seed=2), 2, rank=2)
    with pytest.raises(ValueError, match=r"target_keys must have shape \(8,\)"):
        multi_turn_contrastive_loss(unit(4, 8, seed=1), unit(8, 8, seed=2), 2, target_keys=torch.arange(4))
    with pytest.raises(ValueError, match=r"negative_keys must have shape \(4,\)"):
        multi_turn_contrastive_loss(
            unit(4, 8, seed=1), unit(8, 8, seed=2), 2, hard_negatives=unit(4, 8, seed=3), negative_keys=torch.arange(8)
        )


def reference_four_way(
    query, query_aux, target, target_aux, temperature, rank, negatives=None, target_keys=None, negative_keys=None
):
    """The four terms written pair by pair: each query against every target, then every negative.

    With keys, a target or negative whose key is the positive's key is left out (the positive stays).
    """
    local = query.shape[0]
    pairs = {
        "query_target": (query, target, query),
        "query_target_aux": (query, target_aux, query),
        "query_aux_target": (query_aux, target, query_aux),
        "query_aux_target_aux": (query_aux, target_aux, query_aux),
    }
    terms = {}
    for name, (anchors, candidates, negative_anchors) in pairs.items():
        total = 0.0
        for i in range(local):
            own = rank * local + i
            positive = float(anchors[i] @ candidates[own]) / temperature
            logits = [
                float(anchors[i] @ candidates[j]) / temperature
                for j in range(candidates.shape[0])
                if j == own or target_keys is None or target_keys[j] != target_keys[own]
            ]
            if negatives is not None:
                keys = negative_keys if negative_keys is not None else [None] * len(negatives)
                logits += [
                    float(negative_anchors[i] @ n) / temperature
                    for n, key in zip(negatives, keys, strict=True)
                    if target_keys is None or key != target_keys[own]
                ]
            top = max(logits)
            total += -(positive - top - math.log(sum(math.exp(v - top) for v in logits)))
        terms[name] = total / local
    return terms


@pytest.mark.parametrize("batch, world, rank", [(3, 1, 0), (2, 2, 0), (2, 2, 1), (1, 3, 2)])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_four_way_matches_the_pairwise_reference(batch, world, rank, with_negatives):
    query, query_aux = unit(batch, 16, seed=31), unit(batch, 16, seed=32)
    target, target_aux = unit(world * batch, 16, seed=33), unit(world * batch, 16, seed=34)
    negatives = unit(world * batch, 16, seed=35) if with_negatives else None
    got = four_way_contrastive_loss(query, query_aux, target, target_aux, 0.05, rank, hard_negatives=negatives)
    expected = reference_four_way(query, query_aux, target, target_aux, 0.05, rank, negatives)
    assert {k: v.item() for k, v in got.terms().items()} == pytest.approx(expected, rel=1e-9)
    assert got.total.item() == pytest.approx(sum(expected.values()), rel=1e-9)


def test_four_way_hand_computed_at_rank_0():
    e1, e2 = torch.eye(2, dtype=torch.float64)
    query, query_aux, target = torch.stack([e1, e2]), torch.stack([e2, e1]), torch.stack([e1, e2])
    # the main query sits on its positive (logits [1, 0]), the auxiliary one on the other target ([0, 1])
    got = four_way_contrastive_loss(query, query_aux, target, target, 1.0)
    near, far = math.log(1 + 1 / math.e), math.log(1 + math.e)
    assert {k: v.item() for k, v in got.terms().items()} == pytest.approx(
        {"query_target": near, "query_target_aux": near, "query_aux_target": far, "query_aux_target_aux": far}
    )
    assert got.total.item() == pytest.approx(2 * near + 2 * far)
    # one hard negative, e1: the main query's terms append query . e1, the auxiliary query's query_aux . e1
    # main: row 0 [1, 0 | 1] -> log(2 + 1/e); row 1 [0, 1 | 0] -> log(1 + 2/e)
    # aux:  row 0 [0, 1 | 0] -> log(2 + e);   row 1 [1, 0 | 1] -> log(1 + 2e)
    got = four_way_contrastive_loss(query, query_aux, target, target, 1.0, hard_negatives=e1[None])
    main = (math.log(2 + 1 / math.e) + math.log(1 + 2 / math.e)) / 2
    aux = (math.log(2 + math.e) + math.log(1 + 2 * math.e)) / 2
    assert {k: v.item() for k, v in got.terms().items()} == pytest.approx(
        {"query_target": main, "query_target_aux": main, "query_aux_target": aux, "query_aux_target_aux": aux}
    )


def test_four_way_hand_computed_at_rank_1():
    e1, e2 = torch.eye(2, dtype=torch.float64)
    # one query per rank; rank 1's positives are the second rows
    query, query_aux = e1[None], e2[None]
    target, target_aux = torch.stack([e2, e1]), torch.stack([e1, e2])
    got = four_way_contrastive_loss(query, query_aux, target, target_aux, 1.0, rank=1)
    near, far = math.log(1 + 1 / math.e), math.log(1 + math.e)
    expected = {"query_target": near, "query_target_aux": far, "query_aux_target": far, "query_aux_target_aux": near}
    assert {k: v.item() for k, v in got.terms().items()} == pytest.approx(expected)
    # at rank 0 the positives would be the first rows: every term flips
    at_rank_0 = four_way_contrastive_loss(query, query_aux, target, target_aux, 1.0, rank=0)
    flipped = {k: near + far - v for k, v in expected.items()}
    assert {k: v.item() for k, v in at_rank_0.terms().items()} == pytest.approx(flipped)
    # two gathered negatives, e1 (rank 0's) and e2 (rank 1's): each term's row gains e^1 + e^0
    negatives = torch.stack([e1, e2])
    got = four_way_contrastive_loss(query, query_aux, target, target_aux, 1.0, rank=1, hard_negatives=negatives)
    plus = {"query_target": math.log(2 + 2 / math.e), "query_aux_target_aux": math.log(2 + 2 / math.e)}
    plus |= {"query_target_aux": math.log(2 + 2 * math.e), "query_aux_target": math.log(2 + 2 * math.e)}
    assert {k: v.item() for k, v in got.terms().items()} == pytest.approx(plus)


def test_four_way_shapes_that_do_not_fit_are_named():
    q, t = unit(2, 8, seed=1), unit(4, 8, seed=2)
    with pytest.raises(ValueError, match="query and query_aux must both be"):
        four_way_contrastive_loss(q, unit(3, 8, seed=3), t, t)
    with pytest.raises(ValueError, match="target and target_aux must both be"):
        four_way_contrastive_loss(q, q, t, unit(2, 8, seed=3))
    with pytest.raises(ValueError, match="does not fit query"):
        four_way_contrastive_loss(q, q, unit(5, 8, seed=3), unit(5, 8, seed=4))
    with pytest.raises(ValueError, match="rank 2 has no block"):
        four_way_contrastive_loss(q, q, t, t, rank=2)
    with pytest.raises(ValueError, match=r"hard_negatives must be \[n, 8\]"):
        four_way_contrastive_loss(q, q, t, t, hard_negatives=unit(4, 6, seed=5))


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    query = unit(2 * 3, 8, seed=10 + rank).requires_grad_()
    target = unit(2 * 3, 8, seed=20 + rank).requires_grad_()
    gathered = all_gather_with_grad(target)
    loss = multi_turn_contrastive_loss(query, gathered, turns=3, temperature=0.05, rank=rank)
    loss.backward()
    torch.save({"loss": loss.detach(), "query": query.grad, "target": target.grad}, f"{out}/rank{rank}.pt")
    dist.barrier()  # a rank that tears down while its peer still talks makes gloo abort
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_gradients(tmp_path):
    world = 2
    mp.spawn(_rank_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    results = {}
    for r in range(world):
        saved = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        results[r] = (saved["loss"].item(), saved["query"], saved["target"])

    queries = [unit(6, 8, seed=10 + r).requires_grad_() for r in range(world)]
    targets = [unit(6, 8, seed=20 + r).requires_grad_() for r in range(world)]
    all_targets = torch.cat(targets)
    losses = [multi_turn_contrastive_loss(queries[r], all_targets, 3, 0.05, rank=r) for r in range(world)]
    # Each rank backpropagates its own loss; all_gather's backward sums the
    # target gradients over ranks, as the sum of the losses does here.
    sum(losses).backward()
    for r in range(world):
        loss, grad_query, grad_target = results[r]
        assert loss == pytest.approx(losses[r].item(), rel=1e-12)
        assert loss == pytest.approx(reference_loss(queries[r].detach(), all_targets.detach(), 3, 0.05, r), rel=1e-9)
        torch.testing.assert_close(grad_query, queries[r].grad)
        torch.testing.assert_close(grad_target, targets[r].grad)


@pytest.mark.parametrize("batch, world, rank", [(4, 1, 0), (3, 2, 1), (2, 3, 2)])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_four_way_with_keys_matches_the_pairwise_reference_that_leaves_repeats_out(batch, world, rank, with_negatives):
    query, query_aux = unit(batch, 16, seed=41), unit(batch, 16, seed=42)
    target, target_aux = unit(world * batch, 16, seed=43), unit(world * batch, 16, seed=44)
    # three distinct targets among the rows: every rank's block repeats some
    target_keys = torch.arange(world * batch) % 3
    negatives = unit(world * batch, 16, seed=45) if with_negatives else None
    negative_keys = (torch.arange(world * batch) + 1) % 3 if with_negatives else None
    got = four_way_contrastive_loss(
        query, query_aux, target, target_aux, 0.05, rank,
        hard_negatives=negatives, target_keys=target_keys, negative_keys=negative_keys,
    )  # fmt: skip
    expected = reference_four_way(
        query, query_aux, target, target_aux, 0.05, rank, negatives, target_keys.tolist(),
        None if negative_keys is None else negative_keys.tolist(),
    )  # fmt: skip
    assert {k: v.item() for k, v in got.terms().items()} == pytest.approx(expected, rel=1e-9)
    unmasked = reference_four_way(query, query_aux, target, target_aux, 0.05, rank, negatives)
    assert got.total.item() < sum(unmasked.values())  # the repeats were there to leave out


def test_four_way_hand_computed_with_a_repeated_target_and_a_repeated_negative():
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    query = target = torch.stack([e1, e2])
    # both samples have the same target (as two "two" answers): neither is the other's negative, in any term
    got = four_way_contrastive_loss(query, query, target, target, 1.0, target_keys=torch.tensor([5, 5]))
    assert {k: v.item() for k, v in got.terms().items()} == pytest.approx(dict.fromkeys(got.terms(), 0.0))
    # distinct targets (keys 5 and 6), negatives e1 with key 5 and e3 with key 7:
    # row 0 (key 5) keeps [1, 0 | e3: 0], e1 is its positive again -> log(e + 2) - 1
    # row 1 (key 6) keeps [0, 1 | e1: 0, e3: 0] -> log(e + 3) - 1
    got = four_way_contrastive_loss(
        query, query, target, target, 1.0,
        hard_negatives=torch.stack([e1, e3]), target_keys=torch.tensor([5, 6]), negative_keys=torch.tensor([5, 7]),
    )  # fmt: skip
    expected = (math.log(math.e + 2) + math.log(math.e + 3)) / 2 - 1
    assert {k: v.item() for k, v in got.terms().items()} == pytest.approx(dict.fromkeys(got.terms(), expected))


def test_four_way_refuses_keys_of_the_wrong_shape():
    query, target = unit(2, 8, seed=1), unit(4, 8, seed=2)
    with pytest.raises(ValueError, match=r"target_keys must have shape \(4,\)"):
        four_way_contrastive_loss(query, query, target, target, target_keys=torch.arange(2))
    with pytest.raises(ValueError, match="negative_keys must have one key per row of hard_negatives"):
        four_way_contrastive_loss(
            query, query, target, target, hard_negatives=unit(4, 8, seed=3),
            target_keys=torch.arange(4), negative_keys=torch.arange(3),
        )  # fmt: skip
