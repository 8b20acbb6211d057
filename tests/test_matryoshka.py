"""Matryoshka representation learning: the loss against a per-dimension reference, GradCache, the settings."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from mlflow.utils.validation import _validate_metric_name

from muco_flow.modeling.loss import four_way_contrastive_loss, matryoshka_loss, multi_turn_contrastive_loss
from muco_flow.modeling.matryoshka import nested_prefix
from muco_flow.training.config import MatryoshkaSettings, TrainingConfig, TrainingConfigError
from muco_flow.training.data import Batch
from muco_flow.training.train import forward_backward
from tests.conftest import load_params
from tests.test_finetune_step import ScalingEngine, reference_terms, stage2_batch
from tests.test_loss import reference_four_way, reference_loss, unit

TEMPERATURE = 0.5


def cut(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """The reference's prefix: each row's first ``dim`` numbers divided by their Euclidean length, by hand."""
    return torch.stack(
        [
            torch.tensor([x / math.sqrt(sum(v * v for v in row[:dim])) for x in row[:dim]], dtype=rows.dtype)
            for row in rows.tolist()
        ]
    )


def test_a_prefix_is_the_first_coordinates_renormalised():
    vectors = torch.tensor([[3.0, 4.0, 12.0], [0.0, -2.0, 1.0]])
    assert nested_prefix(vectors, 2).flatten().tolist() == pytest.approx([0.6, 0.8, 0.0, -1.0])
    assert nested_prefix(vectors, 3)[0].tolist() == pytest.approx([3 / 13, 4 / 13, 12 / 13])
    with pytest.raises(ValueError, match="4 coordinates does not fit vectors of width 3"):
        nested_prefix(vectors, 4)


@pytest.mark.parametrize("weights", [None, [0.5, 1.0, 2.0]])
@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
def test_the_stage1_loss_is_the_weighted_sum_of_a_reference_per_dimension(weights, world, rank):
    batch, turns, dims = 2, 3, [4, 8, 16]
    query, target = unit(batch * turns, 16, seed=1), unit(world * batch * turns, 16, seed=2)
    negatives = unit(world * batch * turns, 16, seed=3)
    keys = torch.tensor([0, 1, 2, 3, 1, 4, 5, 6, 0, 7, 8, 9][: target.shape[0]])

    def stage1(embeddings):
        q, t, n = embeddings
        return multi_turn_contrastive_loss(q, t, turns, TEMPERATURE, rank, hard_negatives=n, target_keys=keys), {}

    total, terms = matryoshka_loss(stage1, [query, target, negatives], dims, weights)

    expected = {}  # a plain loop over the widths, InfoNCE written pair by pair on hand-cut prefixes
    for dim in dims:
        expected[f"matryoshka_at_{dim}"] = reference_loss(
            cut(query, dim), cut(target, dim), turns, TEMPERATURE, rank, cut(negatives, dim), keys
        )
    assert {name: term.item() for name, term in terms.items()} == pytest.approx(expected, rel=1e-9)
    factors = weights or [1.0, 1.0, 1.0]
    assert total.item() == pytest.approx(
        sum(w * expected[f"matryoshka_at_{d}"] for w, d in zip(factors, dims, strict=True)), rel=1e-9
    )


def test_the_four_way_loss_per_dimension_logs_each_widths_terms():
    dims, weights = [2, 8], [3.0, 1.0]
    sides = [unit(3, 8, seed=s) for s in (31, 32)] + [unit(6, 8, seed=s) for s in (33, 34)]
    negatives = unit(6, 8, seed=35)

    def four_way(embeddings):
        value = four_way_contrastive_loss(*embeddings[:4], TEMPERATURE, 1, hard_negatives=embeddings[4])
        return value.total, value.terms()

    total, terms = matryoshka_loss(four_way, [*sides, negatives], dims, weights)

    expected_total = 0.0
    for dim, weight in zip(dims, weights, strict=True):
        reference = reference_four_way(*(cut(s, dim) for s in sides), TEMPERATURE, 1, cut(negatives, dim))
        assert {name: terms[f"{name}_at_{dim}"].item() for name in reference} == pytest.approx(reference, rel=1e-9)
        assert terms[f"matryoshka_at_{dim}"].item() == pytest.approx(sum(reference.values()), rel=1e-9)
        expected_total += weight * sum(reference.values())
    assert total.item() == pytest.approx(expected_total, rel=1e-9)


@pytest.mark.parametrize(
    "dims, weights, message",
    [
        ([8, 4], None, "strictly increasing, got \\[8, 4\\]"),
        ([0, 4], None, "positive integers"),
        ([4, 32], None, "at most the embedding width 16, got 32"),
        ([], None, "at least one dimension"),
        ([4, 8], [1.0], "one weight per dimension \\(2\\), got 1"),
    ],
)
def test_the_loss_refuses_dimensions_that_are_not_nested_prefixes(dims, weights, message):
    embeddings = [unit(2, 16, seed=1), unit(2, 16, seed=2)]
    with pytest.raises(ValueError, match=message):
        matryoshka_loss(lambda e: (e[0].sum(), {}), embeddings, dims, weights)


def stage1_batch(query: torch.Tensor, target: torch.Tensor, negative: torch.Tensor, turns: int, first: int) -> Batch:
    """Rows ``first`` on of a batch whose targets all differ (keys 0, 1, ...) and whose negatives are other texts."""
    samples = len(query) // turns
    return Batch(
        query={"rows": query},
        target={"rows": target},
        turns=turns,
        conversation_ids=[f"s{i}" for i in range(samples)],
        target_keys=torch.arange(samples * turns) + first,
        negative={"rows": negative},
        negative_keys=torch.arange(samples * turns) + first + 100,
    )


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("chunked", [False, True])
def test_under_grad_cache_the_matryoshka_step_gives_the_whole_batchs_loss_and_gradient(stage, chunked):
    generator = torch.Generator().manual_seed(11)
    samples, turns, dim = 4, 2, 6
    query, target, negative = (torch.randn(samples * turns, dim, generator=generator) for _ in range(3))
    matryoshka = MatryoshkaSettings(dims=[2, 4, 6], weights=[1.0, 0.5, 0.25])
    settings = dict(
        temperature=TEMPERATURE,
        symmetric_loss=True,
        mask_duplicate_targets=True,
        four_way=stage == 2,
        matryoshka=matryoshka,
    )

    def batch(rows: slice) -> Batch:
        if stage == 2:  # one negative per sample, rows [main, aux] per sample; keys unique across chunks
            samples_in = range(rows.start // 2, (rows.stop or len(query)) // 2)
            return stage2_batch(
                query[rows],
                target[rows],
                negative[rows][::2],
                keys=list(samples_in),
                negative_keys=[100 + i for i in samples_in],
            )
        return stage1_batch(query[rows], target[rows], negative[rows], turns, rows.start)

    whole = ScalingEngine(dim)
    loss, terms = forward_backward(whole, [batch(slice(0, None))], torch.device("cpu"), **settings)
    cached = ScalingEngine(dim)
    parts = [batch(slice(0, 4)), batch(slice(4, None))] if chunked else [batch(slice(0, None))]
    cached_loss, cached_terms = forward_backward(cached, parts, torch.device("cpu"), grad_cache=True, **settings)

    assert cached_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert {k: v.item() for k, v in cached_terms.items()} == pytest.approx({k: v.item() for k, v in terms.items()})
    torch.testing.assert_close(cached.weight.grad, whole.weight.grad, rtol=1e-5, atol=1e-6)
    for name in terms:  # train.py logs each as loss/<name>: a name MLflow takes
        _validate_metric_name(f"loss/{name}")
    assert sorted(name for name in terms if name.startswith("matryoshka_at_")) == [
        "matryoshka_at_2",
        "matryoshka_at_4",
        "matryoshka_at_6",
    ]
    assert loss.item() == pytest.approx(
        sum(w * terms[f"matryoshka_at_{d}"].item() for d, w in zip([2, 4, 6], [1, 0.5, 0.25], strict=True))
    )


def test_the_stage2_step_at_one_width_is_the_reference_on_the_cut_embeddings():
    generator = torch.Generator().manual_seed(5)
    samples, dim = 3, 6
    query, target = (
        torch.randn(2 * samples, dim, generator=generator),
        torch.randn(2 * samples, dim, generator=generator),
    )
    engine = ScalingEngine(dim)
    weight = engine.weight.detach()
    loss, terms = forward_backward(
        engine,
        [stage2_batch(query, target, None)],
        torch.device("cpu"),
        temperature=TEMPERATURE,
        symmetric_loss=False,
        mask_duplicate_targets=True,
        four_way=True,
        matryoshka=MatryoshkaSettings(dims=[3], weights=[2.0]),
    )
    expected = reference_terms(cut(query * weight, 3), cut(target * weight, 3), None)
    assert {name: terms[f"{name}_at_3"].item() for name in expected} == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(2 * sum(expected.values()), rel=1e-5)


def with_matryoshka(**values) -> dict:
    params = copy.deepcopy(load_params()["training"])
    params["matryoshka"] = {"dims": None, "weights": None} | values
    return params


def test_the_settings_are_off_by_default_and_enter_the_resume_fingerprint():
    off = TrainingConfig.from_dict(with_matryoshka())
    on = TrainingConfig.from_dict(with_matryoshka(dims=[16, 32, 64, 128]))
    weighted = TrainingConfig.from_dict(with_matryoshka(dims=[16, 32, 64, 128], weights=[1, 1, 1, 2]))
    assert TrainingConfig.from_dict(load_params()["training"]).matryoshka == MatryoshkaSettings(None, None)
    assert TrainingConfig.from_dict(load_params("cluster")["training"]).matryoshka == MatryoshkaSettings(None, None)
    assert on.matryoshka.weights is None and weighted.matryoshka.weights == [1.0, 1.0, 1.0, 2.0]
    fingerprints = [settings.fingerprinted()["matryoshka"] for settings in (off, on, weighted)]
    assert len({repr(f) for f in fingerprints}) == 3


@pytest.mark.parametrize(
    "values, message",
    [
        ({"dims": [64, 32]}, "training.matryoshka.dims must be strictly increasing, got \\[64, 32\\]"),
        ({"dims": [16, 16]}, "training.matryoshka.dims must be strictly increasing"),
        ({"dims": [0, 16]}, "training.matryoshka.dims\\[0\\] must be a positive integer"),
        ({"dims": [16.5]}, "training.matryoshka.dims\\[0\\] must be a positive integer"),
        ({"dims": []}, "training.matryoshka.dims must list at least one dimension"),
        ({"dims": 64}, "training.matryoshka.dims must be a list"),
        (
            {"dims": [16, 32], "weights": [1.0]},
            "training.matryoshka.weights must have one weight per dimension .*2.*got 1",
        ),
        ({"weights": [1.0]}, "training.matryoshka.weights must have one weight per dimension .*0.*got 1"),
        ({"dims": [16], "weights": [0.0]}, "training.matryoshka.weights\\[0\\] must be a positive number"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(values, message):
    with pytest.raises(TrainingConfigError, match=message):
        TrainingConfig.from_dict(with_matryoshka(**values))


def test_dimensions_wider_than_the_model_are_refused_once_its_width_is_known():
    settings = MatryoshkaSettings(dims=[16, 32, 256], weights=None)
    settings.check_width(256)
    with pytest.raises(
        TrainingConfigError, match=r"training\.matryoshka\.dims must be at most the embedding width 128"
    ):
        settings.check_width(128)
    MatryoshkaSettings(dims=None, weights=None).check_width(8)  # off: nothing to check
