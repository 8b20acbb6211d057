"""Ingest throughput and peak memory as the row count grows.

    python benchmarks/ingest_scaling.py --rows 1000 10000 100000

Synthetic snapshots reuse the M3T-mini images (rows cycle through them, each
with its own id), so the cost per row is the real one: parse, validate, read,
decode and hash an image, write a shard. Each size runs in a fresh process, so
the peak RSS reported is that size's alone. Results go to
data/08_reporting/benchmarks/ingest_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from muco_flow.data import schema
from muco_flow.data.m3t_mini import MiniSampleConfig, generate_m3t_mini

OUT = Path("data/08_reporting/benchmarks/ingest_scaling.json")


def build_snapshot(root: Path, rows: int) -> None:
    files = generate_m3t_mini(
        MiniSampleConfig(train_images=256, heldout_images=1, eval_queries_per_dataset=2, eval_candidates=2)
    )
    base = pq.read_table(pa.BufferReader(files[schema.TRAIN_META_FILE])).to_pylist()
    for name, data in files.items():
        if name.startswith("images/train/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    (root / "M3T_train").mkdir(parents=True)
    writer = pq.ParquetWriter(root / schema.TRAIN_META_FILE, schema.M3T_ARROW_SCHEMA)
    for start in range(0, rows, 10_000):
        chunk = [
            {**base[i % len(base)], schema.SAMPLE_ID: f"synthetic-{i:08d}"}
            for i in range(start, min(rows, start + 10_000))
        ]
        writer.write_table(pa.Table.from_pylist(chunk, schema=schema.M3T_ARROW_SCHEMA), row_group_size=5_000)
    writer.close()


def child(root: str, out: str) -> None:
    """Runs one ingest and prints its wall time and peak RSS as JSON."""
    from muco_flow.data.ingest import IngestConfig, ingest_m3t_snapshot
    from muco_flow.data.sources import LocalSnapshot

    start = time.perf_counter()
    manifest = ingest_m3t_snapshot(LocalSnapshot(root, schema.TRAIN_META_FILE), Path(out), IngestConfig())
    elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": elapsed, "peak_rss_mib": peak_kib / 1024, "counts": manifest["counts"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            root, out = Path(tmp) / "snapshot", Path(tmp) / "out"
            out.mkdir()
            build_snapshot(root, rows)
            run = subprocess.run(
                [sys.executable, __file__, "--child", str(root), str(out)], capture_output=True, text=True, check=True
            )
            result = json.loads(run.stdout.strip().splitlines()[-1])
            result.update(rows=rows, rows_per_second=rows / result["seconds"])
            results.append(result)
            shutil.rmtree(out, ignore_errors=True)
        print(f"{rows:>8} rows  {result['rows_per_second']:>8.0f} rows/s  peak RSS {result['peak_rss_mib']:>7.1f} MiB")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "python": platform.python_version(),
                "cpus": __import__("os").cpu_count(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
