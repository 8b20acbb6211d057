"""Stage 2's training step (train.forward_backward with the four-way loss) and the finetune settings."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from muco_flow.pipelines.finetune.nodes import finetuning_settings
from muco_flow.training.data import Batch
from muco_flow.training.init_model import InitModelError, resolve_init_model
from muco_flow.training.train import forward_backward

TEMPERATURE = 0.5


class ScalingEngine(torch.nn.Module):
    """A stand-in for the DeepSpeed engine: each side's rows, scaled by one trainable weight per dimension."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows * self.weight

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def coalesce_grad_reduction(self):
        return contextlib.nullcontext()


def stage2_batch(
    query: torch.Tensor,
    target: torch.Tensor,
    negative: torch.Tensor | None,
    keys: list[int] | None = None,
    negative_keys: list[int] | None = None,
) -> Batch:
    """Rows as the collated stage-2 batch has them: each sample's key once per <|emb|>, one key per negative."""
    samples = len(query) // 2
    keys = keys if keys is not None else list(range(samples))
    if negative is not None and negative_keys is None:
        negative_keys = [100 + i for i in range(len(negative))]
    return Batch(
        query={"rows": query},
        target={"rows": target},
        turns=2,
        conversation_ids=[f"s{i}" for i in range(samples)],
        target_keys=torch.tensor(keys).repeat_interleave(2),
        negative=None if negative is None else {"rows": negative},
        negative_keys=None if negative is None else torch.tensor(negative_keys),
    )


def reference_terms(query, target, negative, keys=None, negative_keys=None) -> dict[str, float]:
    """Pair by pair: query i's positive is target i; every other target and every negative is a negative.

    The rows come as [main_0, aux_0, main_1, aux_1, ...]; the negatives are scored by the query
    embedding of the term (main for the first two terms, auxiliary for the last two). With keys,
    a target or negative with the positive's key is no negative.
    """
    q, qa, t, ta = query[0::2].tolist(), query[1::2].tolist(), target[0::2].tolist(), target[1::2].tolist()
    negatives = [] if negative is None else negative.tolist()
    keys = keys or list(range(len(t)))
    negative_keys = negative_keys or [None] * len(negatives)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / TEMPERATURE

    def term(anchors, candidates):
        total = 0.0
        for i, anchor in enumerate(anchors):
            kept = [c for j, c in enumerate(candidates) if j == i or keys[j] != keys[i]]
            kept += [n for n, key in zip(negatives, negative_keys, strict=True) if key != keys[i]]
            logits = [dot(anchor, c) for c in kept]
            total += math.log(sum(math.exp(v) for v in logits)) - dot(anchor, candidates[i])
        return total / len(anchors)

    return {
        "query_target": term(q, t),
        "query_target_aux": term(q, ta),
        "query_aux_target": term(qa, t),
        "query_aux_target_aux": term(qa, ta),
    }


@pytest.mark.parametrize("with_negatives", [False, True])
def test_the_stage2_step_splits_main_and_auxiliary_embeddings_into_the_four_way_loss(with_negatives):
    generator = torch.Generator().manual_seed(7)
    samples, dim = 3, 4
    query = torch.randn(2 * samples, dim, generator=generator)
    target = torch.randn(2 * samples, dim, generator=generator)
    negative = torch.randn(samples, dim, generator=generator) if with_negatives else None
    engine = ScalingEngine(dim)
    weight = engine.weight.detach()

    loss, terms = forward_backward(
        engine,
        [stage2_batch(query, target, negative)],
        torch.device("cpu"),
        temperature=TEMPERATURE,
        symmetric_loss=False,
        mask_duplicate_targets=True,
        four_way=True,
    )

    expected = reference_terms(query * weight, target * weight, None if negative is None else negative * weight)
    assert {name: value.item() for name, value in terms.items()} == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(sum(expected.values()), rel=1e-5)
    assert engine.weight.grad is not None and engine.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mask", [False, True])
def test_the_stage2_step_masks_repeated_targets_and_negatives_only_when_asked(mask):
    generator = torch.Generator().manual_seed(11)
    samples, dim = 4, 4
    query = torch.randn(2 * samples, dim, generator=generator)
    target = torch.randn(2 * samples, dim, generator=generator)
    negative = torch.randn(samples, dim, generator=generator)
    # samples 0 and 2 share a target ("two"), sample 3's negative is that target too
    keys, negative_keys = [7, 8, 7, 9], [1, 2, 3, 7]
    engine = ScalingEngine(dim)
    weight = engine.weight.detach()

    _, terms = forward_backward(
        engine,
        [stage2_batch(query, target, negative, keys, negative_keys)],
        torch.device("cpu"),
        temperature=TEMPERATURE,
        symmetric_loss=False,
        mask_duplicate_targets=mask,
        four_way=True,
    )

    masked_by = (keys, negative_keys) if mask else (None, None)
    expected = reference_terms(query * weight, target * weight, negative * weight, *masked_by)
    assert {name: value.item() for name, value in terms.items()} == pytest.approx(expected, rel=1e-5)
    if mask:
        assert expected != pytest.approx(reference_terms(query * weight, target * weight, negative * weight))


def test_the_stage2_step_under_grad_cache_gives_the_whole_batchs_loss_and_gradient():
    generator = torch.Generator().manual_seed(3)
    samples, dim = 4, 5
    query = torch.randn(2 * samples, dim, generator=generator)
    target = torch.randn(2 * samples, dim, generator=generator)
    negative = torch.randn(samples, dim, generator=generator)
    settings = dict(temperature=TEMPERATURE, symmetric_loss=False, mask_duplicate_targets=True, four_way=True)

    whole = ScalingEngine(dim)
    loss, terms = forward_backward(whole, [stage2_batch(query, target, negative)], torch.device("cpu"), **settings)
    chunked = ScalingEngine(dim)
    chunks = [
        stage2_batch(query[i : i + 4], target[i : i + 4], negative[i // 2 : i // 2 + 2], [i // 2, i // 2 + 1])
        for i in (0, 4)
    ]
    cached_loss, cached_terms = forward_backward(chunked, chunks, torch.device("cpu"), grad_cache=True, **settings)

    assert cached_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert {k: v.item() for k, v in cached_terms.items()} == pytest.approx({k: v.item() for k, v in terms.items()})
    torch.testing.assert_close(chunked.weight.grad, whole.weight.grad, rtol=1e-5, atol=1e-6)


def test_finetuning_settings_lay_the_finetune_block_over_training():
    training = {"learning_rate": 1e-3, "epochs": 8, "output_dir": "a", "embedder": {"lora": {"r": 16, "alpha": 64}}}
    merged = finetuning_settings(training, {"learning_rate": 5e-4, "embedder": {"lora": {"r": 8}}})
    assert merged == {
        "learning_rate": 5e-4,
        "epochs": 8,
        "output_dir": "a",
        "embedder": {"lora": {"r": 8, "alpha": 64}},
    }
    assert training["embedder"]["lora"]["r"] == 16  # not changed in place
    with pytest.raises(ValueError, match=r"finetune.training.learning_rat is not a training setting"):
        finetuning_settings(training, {"learning_rat": 1.0})


def test_the_initial_model_is_the_stage1_runs_unless_init_from_names_another(tmp_path):
    train_run = {"model_dir": "data/06_models/muco/model", "mlflow_run_id": "abc"}
    assert resolve_init_model(None, train_run, "sqlite:///x.db", tmp_path) == ("data/06_models/muco/model", "abc")
    (tmp_path / "release").mkdir()
    (tmp_path / "release/config.json").write_text("{}")
    assert resolve_init_model(str(tmp_path / "release"), train_run, "", tmp_path) == (str(tmp_path / "release"), None)
    with pytest.raises(InitModelError, match="is not a model directory"):
        resolve_init_model(str(tmp_path / "missing"), train_run, "", tmp_path)
    with pytest.raises(InitModelError, match="expected models:/<name>/<version>"):
        resolve_init_model("models:/muco-embedder", train_run, "", tmp_path)
