"""Ingest and format on 2 processes against 1, and split into parts, on a synthetic snapshot.

    python -m benchmarks.data_parallelism --rows 20000

The snapshot is ingest_scaling's (M3T-mini rows and images, each row its own
id). Ingest runs in a fresh process with ``ingest.num_workers`` 1, then 2,
alternating, ``--repeats`` times each (blocks of ``rows_per_shard`` rows);
``image_workers`` is 1, so that the comparison measures processes, not image
threads. Each ingest output is then formatted (the tiny backbone's tokenizer
and image processor, one ingest shard per work item) with ``format.num_workers``
set to the same number, in a fresh process (the tokenizer on one thread per
process, ``TOKENIZERS_PARALLELISM=false``). Then the same snapshot as 3 parts
(as 3 machines would, one after another here, each in its own process) and
their merges, for ingest and then format: every file (shards, rejects,
records, images, manifests) must be byte-identical to the one-process output,
as must the 2-process output. Goals: ingest + format on 2 processes at least
1.6x as fast as on 1; parts identical.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.ingest_scaling import build_snapshot

NAME = "data_parallelism"
MIN_SPEEDUP = 1.6
PARTS = 3


def child_format(shards: Path, out: Path, workers: int, backbone: Path, part: int, parts: int) -> dict[str, Any]:
    """Format part ``part`` of ``parts`` of the ingest output ``shards`` into ``out``; the last part also merges."""
    # one thread per process (the tokenizer would batch on every core), so that the comparison
    # measures processes, as image_workers 1 does for ingest
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from muco_flow.data.conversations import FormatConfig
    from muco_flow.data.formatting import format_m3t_part, merge_format_parts
    from muco_flow.modeling.backbone import load_processors

    tokenizer, image_processor = load_processors(str(backbone))
    config = FormatConfig.from_params({**common.load_parameters()["format"], "num_workers": workers})
    began = time.perf_counter()
    format_m3t_part(shards, out, tokenizer, image_processor, config, part_index=part, num_parts=parts)
    result: dict[str, Any] = {"seconds": time.perf_counter() - began}
    if part == parts - 1:
        result["counts"] = merge_format_parts(shards, out, parts)["counts"]
    return result


def child(snapshot: Path, out: Path, workers: int, rows_per_shard: int, part: int, parts: int) -> dict[str, Any]:
    """Ingest part ``part`` of ``parts`` into ``out`` (all of it when parts is 1); the last part also merges."""
    from muco_flow.data import schema
    from muco_flow.data.ingest import IngestConfig, merge_ingest_parts
    from muco_flow.data.m3t_ingest import ingest_m3t_part
    from muco_flow.data.sources import LocalSnapshot

    params = common.load_parameters()["ingest"]
    config = IngestConfig.from_params(
        {**params, "rows_per_shard": rows_per_shard, "num_workers": workers, "image_workers": 1}
    )
    began = time.perf_counter()
    ingest_m3t_part(LocalSnapshot(snapshot, schema.TRAIN_META_FILE), out, config, part, parts)
    result: dict[str, Any] = {"seconds": time.perf_counter() - began}
    if part == parts - 1:
        result["counts"] = merge_ingest_parts(out, parts)["counts"]
    return result


def _files(directory: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _ingest(snapshot: Path, out: Path, workers: int, rows_per_shard: int, part: int = 0, parts: int = 1) -> dict:
    arguments = ("--child", str(snapshot), str(out), str(workers), str(rows_per_shard), "--part", str(part), str(parts))
    return common.run_fresh_process(f"benchmarks.{NAME}", *arguments)


def _format(shards: Path, out: Path, workers: int, backbone: Path, part: int = 0, parts: int = 1) -> dict:
    arguments = ("--format-child", str(shards), str(out), str(workers), str(backbone), "--part", str(part), str(parts))
    return common.run_fresh_process(f"benchmarks.{NAME}", *arguments)


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds: dict[int, list[float]] = {1: [], 2: []}
    format_seconds: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        snapshot = tmp / "snapshot"
        build_snapshot(snapshot, args.rows)
        outputs: dict[int, dict[str, bytes]] = {}
        for repeat in range(args.repeats):
            for workers in (1, 2):  # alternating, so that a change in the machine's load hits both
                out = tmp / f"workers-{workers}-{repeat}"
                timing = _ingest(snapshot, out, workers, args.rows_per_shard)
                assert timing["counts"]["read"] == args.rows, timing
                formatted = tmp / f"formatted-{workers}-{repeat}"
                format_timing = _format(out, formatted, workers, args.backbone)
                assert format_timing["counts"]["samples"] == timing["counts"]["accepted"], format_timing
                seconds[workers].append(timing["seconds"])
                format_seconds[workers].append(format_timing["seconds"])
                outputs.setdefault(workers, _files(out) | _files(formatted, "formatted/"))
                print(
                    f"{workers} process(es): ingest {timing['seconds']:.1f} s, format {format_timing['seconds']:.1f} s",
                    flush=True,
                )
        split, split_formatted = tmp / "parts", tmp / "parts-formatted"
        part_seconds = [_ingest(snapshot, split, 1, args.rows_per_shard, p, PARTS)["seconds"] for p in range(PARTS)]
        part_seconds = [
            ingest + _format(split, split_formatted, 1, args.backbone, p, PARTS)["seconds"]
            for p, ingest in enumerate(part_seconds)
        ]
        reference = outputs[1]
        identical = _files(split) | _files(split_formatted, "formatted/") == reference and outputs[2] == reference
        shard_files = sum(1 for name in reference if name.startswith("shards/"))
    results: list[dict[str, Any]] = [
        {
            "processes": w,
            "parts": 1,
            "seconds": common.summarize(s),
            "format_seconds": common.summarize(format_seconds[w]),
            "total_seconds": common.summarize([a + b for a, b in zip(s, format_seconds[w], strict=True)]),
            "rows_per_second": common.summarize([args.rows / x for x in s]),
        }
        for w, s in seconds.items()
    ]
    speedup = results[0]["total_seconds"]["median"] / results[1]["total_seconds"]["median"]
    results[1]["speedup_over_1_process"] = speedup
    results.append(
        {
            "processes": 1,
            "parts": PARTS,
            "seconds_per_part": part_seconds,
            "identical_to_one_process": identical,  # and so is the 2-process output
        }
    )
    goals = [
        common.goal(
            "ingest + format, 2 processes against 1 (image_workers 1)",
            f">= {MIN_SPEEDUP}x",
            f"{speedup:.2f}x ({results[0]['total_seconds']['median']:.1f} s -> "
            f"{results[1]['total_seconds']['median']:.1f} s)",
            speedup >= MIN_SPEEDUP,
        ),
        common.goal(
            f"{PARTS} parts, and 2 processes, give the one-process files",
            "byte-identical",
            f"{'identical' if identical else 'DIFFERENT'} ({len(reference)} files, {shard_files} shards)",
            identical,
        ),
    ]
    parameters = {
        "rows": args.rows,
        "rows_per_shard": args.rows_per_shard,
        "repeats": args.repeats,
        "parts": PARTS,
        "image_workers": 1,
    }
    return {"parameters": parameters, "results": results, "goals": goals}


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for r in document["results"]:
        if r["parts"] == 1:
            rows.append(
                [
                    str(r["processes"]),
                    "1",
                    common.spread(r["seconds"], 1),
                    common.spread(r["format_seconds"], 1),
                    common.spread(r["total_seconds"], 1),
                    "-",
                ]
            )
        else:
            seconds = " + ".join(f"{s:.1f}" for s in r["seconds_per_part"])
            same = "identical" if r["identical_to_one_process"] else "DIFFERENT"
            rows.append([str(r["processes"]), str(r["parts"]), "-", "-", seconds, same])
    return ["processes", "parts", "ingest s", "format s", "total s", "files against 1 process"], rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--format-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", type=Path, default=common.TINY_BACKBONE_DIR)
    parser.add_argument("--part", nargs=2, type=int, default=[0, 1], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rows-per-shard", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.child:
        snapshot, out, workers, rows_per_shard = args.child
        result = child(Path(snapshot), Path(out), int(workers), int(rows_per_shard), *args.part)
        print(json.dumps(result))
        return
    if args.format_child:
        shards, out, workers, backbone = args.format_child
        print(json.dumps(child_format(Path(shards), Path(out), int(workers), Path(backbone), *args.part)))
        return
    if args.quick:
        args.rows, args.rows_per_shard, args.repeats = 120, 30, 1
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
