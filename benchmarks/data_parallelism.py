"""Ingest on 2 processes against 1, and split into parts, on a synthetic snapshot.

    python -m benchmarks.data_parallelism --rows 20000

The snapshot is ingest_scaling's (M3T-mini rows and images, each row its own
id). Ingest runs in a fresh process with ``ingest.num_workers`` 1, then 2,
alternating, ``--repeats`` times each (blocks of ``rows_per_shard`` rows);
``image_workers`` is 1, so that the comparison measures processes, not image
threads. Then the same snapshot as 3 parts (as 3 machines would, one after
another here, each in its own process) and their merge: every file (shards,
rejects, manifest) must be byte-identical to the one-process output, as must
the 2-process output. Goals: 2 processes at least 1.6x as fast as 1; parts
identical. (Format's parts are measured by their own step.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.ingest_scaling import build_snapshot

NAME = "data_parallelism"
MIN_SPEEDUP = 1.6
PARTS = 3


def child(snapshot: Path, out: Path, workers: int, rows_per_shard: int, part: int, parts: int) -> dict[str, Any]:
    """Ingest part ``part`` of ``parts`` into ``out`` (all of it when parts is 1); the last part also merges."""
    from muco_flow.data import schema
    from muco_flow.data.ingest import IngestConfig, ingest_m3t_part, merge_ingest_parts
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


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _ingest(snapshot: Path, out: Path, workers: int, rows_per_shard: int, part: int = 0, parts: int = 1) -> dict:
    arguments = ("--child", str(snapshot), str(out), str(workers), str(rows_per_shard), "--part", str(part), str(parts))
    return common.run_fresh_process(f"benchmarks.{NAME}", *arguments)


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds: dict[int, list[float]] = {1: [], 2: []}
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
                seconds[workers].append(timing["seconds"])
                outputs.setdefault(workers, _files(out))
                print(f"{workers} process(es): {timing['seconds']:.1f} s", flush=True)
        split = tmp / "parts"
        part_seconds = [_ingest(snapshot, split, 1, args.rows_per_shard, p, PARTS)["seconds"] for p in range(PARTS)]
        reference = outputs[1]
        identical = _files(split) == reference and outputs[2] == reference
        shard_files = sum(1 for name in reference if name.startswith("shards/"))
    results: list[dict[str, Any]] = [
        {
            "processes": w,
            "parts": 1,
            "seconds": common.summarize(s),
            "rows_per_second": common.summarize([args.rows / x for x in s]),
        }
        for w, s in seconds.items()
    ]
    speedup = results[0]["seconds"]["median"] / results[1]["seconds"]["median"]
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
            "ingest, 2 processes against 1 (image_workers 1)",
            f">= {MIN_SPEEDUP}x",
            f"{speedup:.2f}x ({results[0]['seconds']['median']:.1f} s -> {results[1]['seconds']['median']:.1f} s)",
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
                [str(r["processes"]), "1", common.spread(r["seconds"], 1), common.spread(r["rows_per_second"], 0), "-"]
            )
        else:
            seconds = " + ".join(f"{s:.1f}" for s in r["seconds_per_part"])
            same = "identical" if r["identical_to_one_process"] else "DIFFERENT"
            rows.append([str(r["processes"]), str(r["parts"]), seconds, "-", same])
    return ["processes", "parts", "ingest s", "rows/s", "files against 1 process"], rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
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
    if args.quick:
        args.rows, args.rows_per_shard, args.repeats = 120, 30, 1
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
