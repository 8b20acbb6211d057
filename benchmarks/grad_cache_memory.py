"""GradCache's memory: bounded by the chunk, not the batch.

    python -m benchmarks.grad_cache_memory

One training step as train.py takes it (the training configuration: tiny
backbone, DoRA, ZeRO-2, fp32, one process), on B multi-turn conversations of
the sample's images, with and without GradCache (``--chunk`` conversations
per forward with a graph). Each configuration runs in a fresh process, with
glibc returning blocks over 1 MiB to the system on free, so that its resident
memory follows the tensors alive. Measured:

- graph bytes: the most bytes autograd held for backward at once (every
  tensor saved by a forward with a graph, each storage counted once, until
  the backward that frees it). Weights saved by the matmuls count too: a
  constant that does not grow with the batch;
- step peak RSS: the process's peak resident memory during the step over
  its resident memory just before (model, engine and the collated batch
  already built).

Without GradCache both grow with B; with it, the graph is one chunk's, so
they should stay near flat as B grows. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, workload

NAME = "grad_cache_memory"
FLAT_LIMIT = 1.25  # GradCache: the largest batch's graph bytes over the smallest's


class GraphMeter:
    """The bytes autograd saves for backward, per graph, and the most alive at once.

    Every backward frees what the forwards before it saved (no retain_graph in
    training), so the count restarts after each.
    """

    def __init__(self) -> None:
        self.current, self.peak, self.backwards = 0, 0, 0
        self._seen: set[int] = set()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.current += storage.nbytes()
        return tensor

    def wrap_backward(self, backward):
        def measured(loss, *args, **kwargs):
            self.peak = max(self.peak, self.current)
            self.backwards += 1
            result = backward(loss, *args, **kwargs)
            self.current, self._seen = 0, set()
            return result

        return measured


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Restarts the kernel's peak-RSS count (VmHWM) from the current RSS, so the peak is the step's."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure(settings: dict[str, Any]) -> dict[str, Any]:
    """One step of ``settings['batch']`` conversations, GradCache in chunks of ``settings['chunk']`` (or none)."""
    from muco_flow.training.train import forward_backward

    common.set_threads(settings["threads"])
    workload.start_process_group()
    params = common.load_parameters()
    training = params["training"]
    embedder = workload.training_embedder(params, Path(settings["backbone"]))
    engine = workload.training_engine(embedder, training)
    samples, images = workload.sample_images(Path(settings["sample"]), settings["batch"])
    size = settings["chunk"] or settings["batch"]
    parts = [
        workload.conversation_batch(
            samples[i : i + size],
            images[i : i + size],
            turns=settings["turns"],
            mode="multi_turn",
            embedder=embedder,
            image_processor=embedder.image_processor,
            format_params=params["format"],
        )
        for i in range(0, settings["batch"], size)
    ]
    meter = GraphMeter()
    engine.backward = meter.wrap_backward(engine.backward)
    before = _rss_bytes()
    _reset_peak_rss()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda tensor: tensor):
        loss, _ = forward_backward(
            engine,
            parts,
            workload.CPU,
            temperature=training["temperature"],
            symmetric_loss=training["symmetric_loss"],
            mask_duplicate_targets=training["mask_duplicate_targets"],
            grad_cache=settings["chunk"] is not None,
        )
        engine.step()
    peak = _peak_rss_bytes()
    return {
        "batch": settings["batch"],
        "chunk": settings["chunk"],
        "turns": settings["turns"],
        "backward_passes": meter.backwards,
        "graph_peak_bytes": meter.peak,
        "rss_before_step_mib": before / 2**20,
        "step_peak_rss_over_start_mib": max(0, peak - before) / 2**20,
        "peak_rss_mib": peak / 2**20,
        "loss": loss.item(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for chunk in [None, args.chunk]:
        for batch in args.batches:
            settings = {
                "batch": batch,
                "chunk": chunk,
                "turns": args.turns,
                "threads": args.threads,
                "sample": str(args.sample),
                "backbone": str(args.backbone),
            }
            results.append(
                common.run_fresh_process(
                    "benchmarks.grad_cache_memory",
                    "--child",
                    json.dumps(settings),
                    env={"MALLOC_MMAP_THRESHOLD_": str(2**20)},
                )
            )
    small, large = min(args.batches), max(args.batches)
    by = {(r["chunk"], r["batch"]): r for r in results}

    def growth(chunk: int | None, key: str) -> float:
        return by[(chunk, large)][key] / max(by[(chunk, small)][key], 1e-9)

    cached, uncached = growth(args.chunk, "graph_peak_bytes"), growth(None, "graph_peak_bytes")
    cached_rss, uncached_rss = (growth(c, "step_peak_rss_over_start_mib") for c in (args.chunk, None))
    goals = [
        common.goal(
            f"GradCache (chunk {args.chunk}): graph bytes bounded by the chunk, batch {large} over batch {small}",
            f"at most {FLAT_LIMIT}x",
            f"{cached:.2f}x (without GradCache {uncached:.2f}x)",
            cached <= FLAT_LIMIT,
        ),
        common.goal(
            f"GradCache (chunk {args.chunk}): step peak RSS grows less from batch {small} to {large} than without",
            "smaller growth",
            f"{cached_rss:.2f}x against {uncached_rss:.2f}x",
            cached_rss < uncached_rss,
        ),
    ]
    parameters = {
        "batches": args.batches,
        "chunk": args.chunk,
        "turns": args.turns,
        "threads": args.threads,
        "processes": 1,
        "precision": "fp32",
        "zero": "conf/base/deepspeed/zero2.json",
        "malloc_mmap_threshold": 2**20,
    }
    return {"parameters": parameters, "results": results, "goals": goals}


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["GradCache chunk", "batch", "backward passes", "graph MiB", "step peak RSS over start MiB"]
    rows = [
        [
            str(r["chunk"] or "off"),
            str(r["batch"]),
            str(r["backward_passes"]),
            f"{r['graph_peak_bytes'] / 2**20:,.1f}",
            f"{r['step_peak_rss_over_start_mib']:,.1f}",
        ]
        for r in document["results"]
    ]
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--sample", type=Path, default=common.SAMPLE_DIR)
    parser.add_argument("--backbone", type=Path, default=common.TINY_BACKBONE_DIR)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="conversations per step")
    parser.add_argument("--chunk", type=int, default=4, help="GradCache's conversations per forward with a graph")
    parser.add_argument(
        "--turns", type=int, default=2, help="turns per conversation (2 keeps batch 64 without GradCache near 2 GB)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.quick:
        args.batches, args.chunk, args.turns = [4, 8], 2, 2
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
