"""The data path's rates against the rate at which training consumes its output.

    python -m benchmarks.data_path

A synthetic snapshot (ingest_scaling's) is ingested, then formatted with the
project's format parameters (multi-turn, all 7 turns: one conversation per
sample), then assembled into training batches (image decoding, the image
processor, collation: what each training process does before each step).
Each stage's rate, in samples (= conversations) per second, is set against
training's: full training steps on those same batches with the training
configuration, in one process, times training.launcher.processes_per_node.
That multiplication assumes the processes scale perfectly, so it overstates
training's rate and the ratios reported are lower bounds. Goal: every stage
at least 5x training's rate.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common, workload
from benchmarks.ingest_scaling import build_snapshot, ingest
from muco_flow.data.conversations import FormatConfig
from muco_flow.data.formatting import format_m3t_shards
from muco_flow.training.data import ConversationBatches

NAME = "data_path"
MIN_RATIO = 5.0


def run(args: Any) -> dict[str, Any]:
    common.set_threads(args.threads)
    params = common.load_parameters()
    training = params["training"]
    batch_size = args.batch_size or training["micro_batch_size"]
    processes = training["launcher"]["processes_per_node"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_snapshot(tmp / "snapshot", args.samples)
        fresh = (tmp / f"out-{i}" for i in itertools.count())

        def ingest_once() -> None:
            out = next(fresh)
            out.mkdir()
            ingest(tmp / "snapshot", out)

        ingest_seconds = common.repeat_timed(ingest_once, repeats=args.repeats, budget_seconds=args.budget)
        shards = tmp / "shards"
        shards.mkdir()
        ingest(tmp / "snapshot", shards)

        embedder, engine = _model(params, args.backbone)
        format_config = FormatConfig.from_params(params["format"])

        def format_once() -> dict[str, Any]:
            out = next(fresh)
            out.mkdir()
            return format_m3t_shards(shards, out, embedder.tokenizer, embedder.image_processor, format_config)

        format_seconds = common.repeat_timed(format_once, repeats=args.repeats, budget_seconds=args.budget)
        conversations = tmp / "conversations"
        conversations.mkdir()
        manifest = format_m3t_shards(shards, conversations, embedder.tokenizer, embedder.image_processor, format_config)

        batches = ConversationBatches.for_tokenizer(
            conversations,
            shards,
            embedder.image_processor,
            embedder.tokenizer,
            batch_size=batch_size,
            rank=0,
            world_size=1,
            seed=training["seed"],
        )
        steps = itertools.count()
        assembly_seconds = common.repeat_timed(
            lambda: batches.batch(next(steps)), repeats=args.steps, budget_seconds=args.budget
        )
        step_batches = [batches.batch(step) for step in range(args.steps + args.warmup)]
        queue = iter(step_batches)
        train_seconds = common.repeat_timed(
            lambda: workload.training_step(engine, next(queue), training),
            repeats=args.steps,
            warmup=args.warmup,
            budget_seconds=args.budget,
        )

    samples = args.samples
    turns = manifest["counts"]["turns"] // max(1, manifest["counts"]["conversations"])
    training_one = common.rates(batch_size, train_seconds)
    training_machine = common.rates(batch_size * processes, train_seconds)
    results = [
        {"stage": "ingest", "unit": "samples", "per_second": common.rates(samples, ingest_seconds)},
        {"stage": "format", "unit": "conversations", "per_second": common.rates(samples, format_seconds)},
        {"stage": "batch assembly", "unit": "conversations", "per_second": common.rates(batch_size, assembly_seconds)},
        {"stage": "training, 1 process", "unit": "conversations", "per_second": training_one},
        {
            "stage": f"training, {processes} processes (x{processes})",
            "unit": "conversations",
            "per_second": training_machine,
        },
    ]
    consumption = training_machine["median"]
    for result in results[:3]:
        result["ratio_to_training"] = result["per_second"]["median"] / consumption
    goals = [
        common.goal(
            f"{r['stage']} at least {MIN_RATIO:.0f}x training's consumption",
            f">= {MIN_RATIO:.0f}x",
            f"{r['ratio_to_training']:.1f}x",
            r["ratio_to_training"] >= MIN_RATIO,
        )
        for r in results[:3]
    ]
    parameters = {
        "samples": samples,
        "turns_per_conversation": turns,
        "batch_size": batch_size,
        "training_processes": processes,
        "training_steps": args.steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "budget_seconds": args.budget,
        "threads": args.threads,
        "format": {k: v for k, v in params["format"].items() if k != "templates"},
    }
    return {"parameters": parameters, "results": results, "goals": goals}


def _model(params: dict[str, Any], backbone: Path) -> tuple[Any, Any]:
    workload.start_process_group()
    embedder = workload.training_embedder(params, backbone)
    return embedder, workload.training_engine(embedder, params["training"])


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["stage", "per second", "unit", "x training"]
    rows = [
        [
            r["stage"],
            common.spread(r["per_second"], 1),
            r["unit"],
            f"{r['ratio_to_training']:.1f}" if "ratio_to_training" in r else "",
        ]
        for r in document["results"]
    ]
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--backbone", type=Path, default=common.TINY_BACKBONE_DIR)
    parser.add_argument("--samples", type=int, default=2000, help="rows of the synthetic snapshot")
    parser.add_argument("--batch-size", type=int, default=None, help="default: training.micro_batch_size")
    parser.add_argument("--steps", type=int, default=8, help="timed batches and training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps")
    parser.add_argument("--repeats", type=int, default=3, help="of ingest and format")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per stage after which to stop repeating")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.batch_size, args.steps, args.warmup, args.repeats = 16, 2, 2, 0, 1
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
