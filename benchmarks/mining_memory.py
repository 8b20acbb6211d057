"""Hard-negative mining as the candidate pool grows: throughput and peak memory, pools encoded to disk in blocks.

    python -m benchmarks.mining_memory

For 20k and 200k candidates at d=1536 (Qwen2-VL-2B's width), a fresh process
encodes the pool with a stub encoder (seeded random unit vectors: the model
is not what is measured) into ``EncodedPool`` blocks on disk, then mines the
same 512 training rows against it as the `mine` pipeline does
(``mining.mine.rank_and_filter``: rows a block at a time against the pool
read block by block, each row's top 30 through the false-negative rules at
their defaults; each query is its positive's vector plus noise, so the
positive leads and the threshold keeps the rest). Reported: rows mined per second, the encode time and the
peak RSS of the whole process (glibc told to return freed allocations over
1 MiB, as in evaluation_memory). Goal: the 200k figure within 10% of the 20k
one. The pools' files (1.2 GB at 200k) are deleted after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.evaluation_memory import stub_encoder

NAME = "mining_memory"
MAX_RSS_GROWTH = 1.10


def child(size: int, dim: int, rows: int, block_rows: int, directory: Path) -> dict[str, Any]:
    from muco_flow.evaluation.encoded_pool import EncodedPool, InMemoryPool
    from muco_flow.mining.config import MiningConfig
    from muco_flow.mining.mine import rank_and_filter

    common.set_threads(1)
    config = MiningConfig.from_dict(
        common.load_parameters()["mine"] | {"pool_block_rows": block_rows, "query_block_rows": 256}
    )
    pool = EncodedPool(directory, range(size), stub_encoder(dim), key_parts=["stub"], block_rows=block_rows)
    began = time.perf_counter()
    pool.ensure()
    encode_seconds = time.perf_counter() - began
    generator = torch.Generator().manual_seed(1)
    positives = torch.randint(0, size, (rows,), generator=generator).tolist()
    # each query near its positive (cosine ~0.7), as a trained model puts them: the threshold keeps the others
    noise = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)
    queries = InMemoryPool(torch.nn.functional.normalize(pool.rows(positives) + noise, dim=1))
    began = time.perf_counter()
    negatives = rank_and_filter(
        list(range(rows)), positives, queries, pool, config, duplicates=lambda positive: lambda candidate: False
    )
    mine_seconds = time.perf_counter() - began
    return {
        "peak_rss_mib": common.peak_rss_mib(),
        "encode_seconds": encode_seconds,
        "mine_seconds": mine_seconds,
        "rows_per_second": rows / mine_seconds,
        "negatives_per_row": sum(map(len, negatives)) / rows,
        "pool_mib": size * dim * 4 / 2**20,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            measured = common.run_fresh_process(
                f"benchmarks.{NAME}",
                *("--child", str(size), str(args.dim), str(args.rows), str(args.block_rows), tmp),
                env={"MALLOC_MMAP_THRESHOLD_": str(2**20)},
            )
            shutil.rmtree(tmp, ignore_errors=True)
        results.append({"candidates": size, "dim": args.dim, "rows": args.rows, **measured})
        print(
            f"{size:>10,} candidates: {measured['rows_per_second']:.1f} rows/s, "
            f"peak RSS {measured['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    goals = [common.rss_growth_goal("mining", results, args.dim, MAX_RSS_GROWTH)]
    parameters = {"sizes": args.sizes, "dim": args.dim, "rows": args.rows, "block_rows": args.block_rows}
    return {"parameters": parameters, "results": results, "goals": goals}


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [
        [
            f"{r['candidates']:,}",
            f"{r['pool_mib']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['encode_seconds']:.1f}",
            f"{r['rows_per_second']:.1f}",
            f"{r['negatives_per_row']:.2f}",
        ]
        for r in document["results"]
    ]
    headers = ["candidates", "pool MiB (on disk)", "peak RSS MiB", "encode+write s", "rows mined/s", "negatives/row"]
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--block-rows", type=int, default=8192)
    parser.add_argument("--tmp", default=None, help="where the encoded pools go (deleted after)")
    args = parser.parse_args(argv)
    if args.child:
        size, dim, rows, block_rows, directory = args.child
        print(json.dumps(child(int(size), int(dim), int(rows), int(block_rows), Path(directory))))
        return
    if args.quick:
        args.sizes, args.dim, args.rows, args.block_rows = [2000, 20000], 64, 64, 1000
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
