"""Evaluation memory as the candidate pool grows: pools encoded to disk in blocks, ranked a block at a time.

    python -m benchmarks.evaluation_memory

For 100k and 1M candidates at d=1536 (Qwen2-VL-2B's width), a fresh process
encodes the pool with a stub encoder (seeded random unit vectors: the
scoring side is what is measured) into ``EncodedPool`` blocks on disk, then
ranks every query's positive in the whole pool (``chunked_positive_ranks``)
and takes each query's top 10 (``chunked_top_k`` over the blocks), as
evaluation does. Peak RSS of the whole process is reported; as in
retrieval_scaling, glibc is told to return freed allocations over 1 MiB
(MALLOC_MMAP_THRESHOLD_) so that RSS shows what is held. Goal: the 1M
figure within 10% of the 100k one. The pools' files (6 GB at 1M) are
deleted after.
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

NAME = "evaluation_memory"
MAX_RSS_GROWTH = 1.10


def stub_encoder(dim: int, block_rows: int):
    def encode(items: range) -> torch.Tensor:
        generator = torch.Generator().manual_seed(items[0] // block_rows)
        return torch.nn.functional.normalize(torch.randn(len(items), dim, generator=generator), dim=1)

    return encode


def child(size: int, dim: int, queries: int, block_rows: int, directory: Path) -> dict[str, Any]:
    from muco_flow.evaluation.encoded_pool import EncodedPool
    from muco_flow.evaluation.retrieval import chunked_positive_ranks, chunked_top_k

    common.set_threads(1)
    pool = EncodedPool(directory, range(size), stub_encoder(dim, block_rows), key_parts=["stub"], block_rows=block_rows)
    began = time.perf_counter()
    pool.ensure()
    encode_seconds = time.perf_counter() - began
    generator = torch.Generator().manual_seed(1)
    query_vectors = torch.nn.functional.normalize(torch.randn(queries, dim, generator=generator), dim=1)
    positives = [[int(p)] for p in torch.randint(0, size, (queries,), generator=generator)]
    began = time.perf_counter()
    ranks = chunked_positive_ranks(query_vectors, pool, positives)
    chunked_top_k(query_vectors, pool.blocks(), 10)
    return {
        "peak_rss_mib": common.peak_rss_mib(),
        "encode_seconds": encode_seconds,
        "score_seconds": time.perf_counter() - began,
        "median_rank": sorted(r[0] for r in ranks)[len(ranks) // 2],
        "pool_mib": size * dim * 4 / 2**20,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            measured = common.run_fresh_process(
                f"benchmarks.{NAME}",
                *("--child", str(size), str(args.dim), str(args.queries), str(args.block_rows), tmp),
                env={"MALLOC_MMAP_THRESHOLD_": str(2**20)},
            )
            shutil.rmtree(tmp, ignore_errors=True)
        results.append({"candidates": size, "dim": args.dim, **measured})
        print(f"{size:>10,} candidates: peak RSS {measured['peak_rss_mib']:.0f} MiB", flush=True)
    goals = [common.rss_growth_goal("evaluation", results, args.dim, MAX_RSS_GROWTH)]
    parameters = {"sizes": args.sizes, "dim": args.dim, "queries": args.queries, "block_rows": args.block_rows}
    return {"parameters": parameters, "results": results, "goals": goals}


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [
        [
            f"{r['candidates']:,}",
            f"{r['pool_mib']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['encode_seconds']:.0f}",
            f"{r['score_seconds']:.0f}",
        ]
        for r in document["results"]
    ]
    return ["candidates", "pool MiB (on disk)", "peak RSS MiB", "encode+write s", "rank+top-10 s"], rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--block-rows", type=int, default=32768)
    parser.add_argument("--tmp", default=None, help="where the encoded pools go (deleted after)")
    args = parser.parse_args(argv)
    if args.child:
        size, dim, queries, block_rows, directory = args.child
        print(json.dumps(child(int(size), int(dim), int(queries), int(block_rows), Path(directory))))
        return
    if args.quick:
        args.sizes, args.dim, args.queries, args.block_rows = [2000, 20000], 64, 16, 1000
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
