"""GradCache gives the uncached step's gradients: plain torch and DeepSpeed ZeRO-2, 2 gloo processes, fp32."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from muco_flow.modeling.loss import four_way_contrastive_loss, matryoshka_loss, multi_turn_contrastive_loss
from muco_flow.training.distributed import all_gather_with_grad
from muco_flow.training.grad_cache import grad_cache_step
from tests.servers import free_port

WORLD = 2
TURNS = 2
SAMPLES = 6  # per rank; chunks of 4 leave a last chunk of 2
CHUNK = 4
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MATRYOSHKA_DIMS = (2, 4, 8)  # nested prefixes of the Encoder's 8-d output


class Encoder(nn.Module):
    """A small embedder with dropout, so that chunks must be re-run with their own random state."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank and in every copy
        self.layers = nn.Sequential(nn.Linear(6, 32), nn.Dropout(dropout), nn.Tanh(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(x), dim=-1)


def rank_inputs(rank: int) -> dict[str, torch.Tensor]:
    """This rank's batch: per sample, K query rows, K target rows, K hard negative rows."""
    g = torch.Generator().manual_seed(100 + rank)
    return {side: torch.randn(SAMPLES * TURNS, 6, generator=g) for side in ("query", "target", "negative")}


def chunks_of(inputs: dict[str, torch.Tensor], samples: int) -> list[dict[str, torch.Tensor]]:
    rows = samples * TURNS  # sample-major rows: a chunk is whole samples
    return [{k: v[i : i + rows] for k, v in inputs.items()} for i in range(0, SAMPLES * TURNS, rows)]


def stage_1(model: nn.Module):
    """Stage 1's shape: query, target and hard negative embeddings, the multi-turn loss."""

    def embed(chunk):
        return model(chunk["query"]), model(chunk["target"]), model(chunk["negative"])

    def loss(embeddings):
        query, target, negative = embeddings
        value = multi_turn_contrastive_loss(
            query,
            all_gather_with_grad(target),
            TURNS,
            0.05,
            dist.get_rank(),
            hard_negatives=all_gather_with_grad(negative),
        )
        return value, {}

    return embed, loss


def stage_2(model: nn.Module, aux: nn.Module):
    """Stage 2's shape: a main and an auxiliary embedding per side, the four-way loss."""

    def embed(chunk):
        return (
            model(chunk["query"]),
            aux(chunk["query"]),
            model(chunk["target"]),
            aux(chunk["target"]),
            model(chunk["negative"]),
        )

    def loss(embeddings):
        query, query_aux, target, target_aux, negative = embeddings
        value = four_way_contrastive_loss(
            query,
            query_aux,
            all_gather_with_grad(target),
            all_gather_with_grad(target_aux),
            0.05,
            dist.get_rank(),
            hard_negatives=all_gather_with_grad(negative),
        )
        return value.total, value.terms()

    return embed, loss


def _gradients(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


def _plain_worker(rank: int, port: int, out: str, stage: int, dropout: float, matryoshka: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    inputs = rank_inputs(rank)
    results = {}
    for mode in ("uncached", "chunked_graph", "grad_cache"):
        modules = [Encoder(dropout)] + ([Encoder(dropout)] if stage == 2 else [])
        embed, stage_loss = stage_1(*modules) if stage == 1 else stage_2(*modules)
        if matryoshka:  # the prefixes are gathered across ranks inside stage_loss, once per width

            def loss(embeddings, stage_loss=stage_loss):
                return matryoshka_loss(stage_loss, embeddings, MATRYOSHKA_DIMS, [1.0, 0.5, 0.25])
        else:
            loss = stage_loss
        torch.manual_seed(1000 + rank)
        if mode == "grad_cache":
            value, terms = grad_cache_step(chunks_of(inputs, CHUNK // TURNS), embed, loss)
        else:
            # uncached: one forward per side over the whole batch; chunked_graph: the
            # chunks' forwards in GradCache's order, all with a graph (same dropout masks)
            parts = [embed(c) for c in chunks_of(inputs, SAMPLES if mode == "uncached" else CHUNK // TURNS)]
            value, terms = loss([torch.cat(p) for p in zip(*parts, strict=True)])
            value.backward()
            value, terms = value.detach(), {k: v.detach() for k, v in terms.items()}
        results[mode] = {
            "loss": value,
            "terms": terms,
            "gradients": _gradients(*modules),
            "random_state_after": torch.get_rng_state(),
        }
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _run(worker, out: Path, *args) -> list[dict]:
    """Runs ``worker(rank, port, out, *args)`` in WORLD gloo processes; returns what each saved."""
    mp.spawn(worker, args=(free_port(), str(out), *args), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("stage, matryoshka", [(1, False), (2, False), (1, True)])
def test_without_dropout_the_gradients_are_the_uncached_steps(tmp_path, stage, matryoshka):
    terms = {"query_target", "query_target_aux", "query_aux_target", "query_aux_target_aux"} if stage == 2 else set()
    if matryoshka:
        terms = {f"matryoshka_at_{d}" for d in MATRYOSHKA_DIMS}
    for result in _run(_plain_worker, tmp_path, stage, 0.0, matryoshka):
        uncached, cached = result["uncached"], result["grad_cache"]
        torch.testing.assert_close(cached["loss"], uncached["loss"], **TOLERANCE)
        assert cached["terms"].keys() == uncached["terms"].keys() == terms
        for name, term in uncached["terms"].items():
            torch.testing.assert_close(cached["terms"][name], term, **TOLERANCE)
        assert cached["gradients"].keys() == uncached["gradients"].keys()
        for name, gradient in uncached["gradients"].items():
            assert gradient.abs().max() > 1e-4, name  # the loss reaches every parameter
            torch.testing.assert_close(cached["gradients"][name], gradient, **TOLERANCE, msg=name)


@pytest.mark.slow
def test_with_dropout_each_chunk_is_rerun_with_its_own_masks(tmp_path):
    """Dropout draws per forward: GradCache must equal the same forwards done with a graph."""
    for result in _run(_plain_worker, tmp_path, 1, 0.3):
        reference, cached = result["chunked_graph"], result["grad_cache"]
        torch.testing.assert_close(cached["loss"], reference["loss"], **TOLERANCE)
        for name, gradient in reference["gradients"].items():
            torch.testing.assert_close(cached["gradients"][name], gradient, **TOLERANCE, msg=name)
        # and it leaves the generator where the forwards with a graph left it
        assert torch.equal(cached["random_state_after"], reference["random_state_after"])
        # (the masks differ from the uncached step's, which draws them per side, not per chunk)
        assert not torch.allclose(result["uncached"]["loss"], cached["loss"])


def _deepspeed_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from muco_flow.training.deepspeed_config import load_deepspeed_template, resolve_deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    config = resolve_deepspeed_config(
        load_deepspeed_template(PROJECT_ROOT / "conf/base/deepspeed/zero2.json"),
        precision="fp32",
        learning_rate=1e-2,
        offload_optimizer=False,
        micro_batch_size=SAMPLES,
        gradient_accumulation_steps=1,
        gradient_clipping=1.0,
        on_cpu=True,
    )
    inputs = rank_inputs(rank)
    results = {}
    for mode in ("uncached", "grad_cache"):
        model = Encoder(0.0)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
        embed, loss = stage_1(engine)
        steps = []
        for _ in range(2):  # two optimizer steps: the second starts from the first's update
            if mode == "uncached":
                value, _ = loss(list(embed(inputs)))
                engine.backward(value)
            else:
                with engine.coalesce_grad_reduction():
                    value, _ = grad_cache_step(chunks_of(inputs, CHUNK // TURNS), embed, loss, engine.backward)
            gradients = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
            engine.step()
            steps.append({"loss": value.detach(), "gradients": gradients})
        parameters = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        results[mode] = {"steps": steps, "parameters": parameters, "global_steps": engine.global_steps}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_under_deepspeed_zero2_the_gradients_and_updates_are_the_uncached_steps(tmp_path):
    """ZeRO-2 reduces the chunks' gradients once per step (coalesce_grad_reduction); one optimizer step per batch."""
    assert json.loads((PROJECT_ROOT / "conf/base/deepspeed/zero2.json").read_text())["zero_optimization"]["stage"] == 2
    results = _run(_deepspeed_worker, tmp_path)
    for result in results:
        uncached, cached = result["uncached"], result["grad_cache"]
        assert cached["global_steps"] == uncached["global_steps"] == 2
        for step_uncached, step_cached in zip(uncached["steps"], cached["steps"], strict=True):
            torch.testing.assert_close(step_cached["loss"], step_uncached["loss"], **TOLERANCE)
            for name, gradient in step_uncached["gradients"].items():
                assert gradient.abs().max() > 1e-4, name
                torch.testing.assert_close(step_cached["gradients"][name], gradient, **TOLERANCE, msg=name)
        for name, parameter in uncached["parameters"].items():
            torch.testing.assert_close(cached["parameters"][name], parameter, **TOLERANCE, msg=name)
    # ZeRO-2 averages over ranks: both ranks hold the same full gradient
    for name, gradient in results[0]["grad_cache"]["steps"][0]["gradients"].items():
        torch.testing.assert_close(results[1]["grad_cache"]["steps"][0]["gradients"][name], gradient, msg=name)
