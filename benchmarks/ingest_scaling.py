"""Ingest throughput and peak memory as the row count grows.

    python -m benchmarks.ingest_scaling --rows 1000 10000 100000

Synthetic snapshots reuse the M3T-mini images (rows cycle through them, each
with its own id), so the cost per row is the real one: parse, validate, read,
decode and hash an image, write a shard. Each repeat of each size runs in a
fresh process, so the peak RSS reported is that ingest's alone. Ingest
streams, so peak RSS should not grow with the row count: the goal is that
it stays within 15% from the second-largest size to the largest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import common
from muco_flow.data import schema
from muco_flow.sample.m3t_mini import MiniSampleConfig, generate_m3t_mini

NAME = "ingest_scaling"
MAX_RSS_GROWTH = 1.15


def build_snapshot(root: Path, rows: int) -> None:
    """An M3T snapshot of ``rows`` rows at ``root``, cycling through 256 M3T-mini samples and their images."""
    files = generate_m3t_mini(
        MiniSampleConfig(train_images=256, heldout_images=1, eval_queries_per_dataset=2, eval_candidates=2)
    )
    base = pq.read_table(pa.BufferReader(files[schema.TRAIN_META_FILE])).to_pylist()
    for name, data in files.items():
        if name.startswith("images/train/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    (root / "M3T_train").mkdir(parents=True)
    # the published columns, and an id column, since repeated rows would otherwise share content
    with_id = schema.M3T_ARROW_SCHEMA.append(pa.field(schema.SAMPLE_ID, pa.string()))
    writer = pq.ParquetWriter(root / schema.TRAIN_META_FILE, with_id)
    for start in range(0, rows, 10_000):
        chunk = [
            {**base[i % len(base)], schema.SAMPLE_ID: f"synthetic-{i:08d}"}
            for i in range(start, min(rows, start + 10_000))
        ]
        writer.write_table(pa.Table.from_pylist(chunk, schema=with_id), row_group_size=5_000)
    writer.close()


def ingest(root: Path, out: Path) -> dict[str, Any]:
    """One ingest of the snapshot at ``root`` into ``out``: its manifest."""
    from muco_flow.data.ingest import IngestConfig
    from muco_flow.data.m3t_ingest import ingest_m3t_snapshot
    from muco_flow.data.sources import LocalSnapshot

    return ingest_m3t_snapshot(LocalSnapshot(str(root), schema.TRAIN_META_FILE), out, IngestConfig())


def child(root: str, out: str) -> None:
    """Runs one ingest and prints its wall time and peak RSS as JSON."""
    start = time.perf_counter()
    manifest = ingest(Path(root), Path(out))
    elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "peak_rss_mib": common.peak_rss_mib(), "counts": manifest["counts"]}))


def measure(rows: int, repeats: int, budget: float) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "snapshot"
        build_snapshot(root, rows)
        while len(runs) < repeats and sum(r["seconds"] for r in runs) < budget:
            out = Path(tmp) / "out"
            out.mkdir()
            runs.append(common.run_fresh_process("benchmarks.ingest_scaling", "--child", str(root), str(out)))
            shutil.rmtree(out)
    return {
        "rows": rows,
        "rows_per_second": common.summarize([rows / r["seconds"] for r in runs]),
        "peak_rss_mib": common.summarize([r["peak_rss_mib"] for r in runs]),
        "counts": runs[-1]["counts"],
    }


def run(args: Any) -> dict[str, Any]:
    results = []
    for rows in args.rows:
        result = measure(rows, args.repeats, args.budget)
        print(f"{rows:>8} rows  {common.spread(result['rows_per_second'], 0)} rows/s", flush=True)
        results.append(result)
    goals = []
    if len(results) >= 2:
        smaller, largest = results[-2], results[-1]
        growth = largest["peak_rss_mib"]["median"] / smaller["peak_rss_mib"]["median"]
        goals.append(
            common.goal(
                f"peak RSS flat from {smaller['rows']:,} to {largest['rows']:,} rows",
                f"<= {MAX_RSS_GROWTH:.2f}x",
                f"{growth:.2f}x",
                growth <= MAX_RSS_GROWTH,
            )
        )
    parameters = {"rows": args.rows, "repeats": args.repeats, "budget_seconds_per_size": args.budget}
    return {"parameters": parameters, "results": results, "goals": goals}


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["rows", "rows/s", "peak RSS MiB", "accepted", "rejected"]
    rows = [
        [
            f"{r['rows']:,}",
            common.spread(r["rows_per_second"], 0),
            common.spread(r["peak_rss_mib"], 1),
            str(r["counts"]["accepted"]),
            str(r["counts"]["rejected"]),
        ]
        for r in document["results"]
    ]
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=90.0, help="seconds per size after which to stop repeating")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    if args.quick:
        args.rows, args.repeats = [20, 40], 1
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
