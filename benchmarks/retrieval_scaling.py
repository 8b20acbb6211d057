"""Top-k retrieval scoring as the candidate pool grows: scores per second and peak memory.

    python -m benchmarks.retrieval_scaling

``chunked_top_k`` (evaluation/retrieval.py) over pools of 10k, 100k and 1M
vectors, at the tiny backbone's hidden size and at 1536 (Qwen2-VL-2B's). The
pool is streamed in blocks of ``pool_chunk`` rows, generated from a seed as
they are needed, as an encoder or a reader of stored embeddings would hand
them over: a 1M x 1536 fp32 pool (6 GB) never exists whole.

Each (pool size, width) runs in a fresh process. Its memory figure is peak
RSS minus the peak before scoring began (after imports, the queries and a
warm-up): what scoring itself takes. It is taken in a second process whose
malloc returns every freed allocation over 1 MiB to the system
(MALLOC_MMAP_THRESHOLD_), so that RSS shows what scoring holds rather than
what glibc keeps cached for reuse; the timed process's figure, under glibc's
defaults, is reported beside it. It should be bounded by one pool block
plus one ``query_chunk x pool_chunk`` block of scores, whatever the pool's
size. Scores per second count query-candidate pairs per second of scoring;
the time spent generating the pool's blocks is measured around each block and
left out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from muco_flow.evaluation.retrieval import chunked_top_k

NAME = "retrieval_scaling"
MAX_MEMORY_GROWTH = 1.15
MAX_OVER_WORKING_SET = 2.0  # room for the allocator's slack and top-k's small buffers
BYTES_PER_VALUE = 4  # fp32


class GeneratedPool:
    """``size`` random vectors of width ``dim`` from ``seed``, produced ``block`` rows at a time.

    Iterating again yields the same vectors. ``generation_seconds`` is the time
    the last pass spent producing them.
    """

    def __init__(self, size: int, dim: int, block: int, seed: int = 0) -> None:
        self.size, self.dim, self.block, self.seed = size, dim, block, seed
        self.generation_seconds = 0.0

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        self.generation_seconds = 0.0
        for start in range(0, self.size, self.block):
            began = time.perf_counter()
            rows = torch.rand(min(self.block, self.size - start), self.dim, generator=generator)
            self.generation_seconds += time.perf_counter() - began
            yield rows
            del rows  # before the next block is made: one block at a time


def working_set_bytes(size: int, dim: int, queries: int, query_chunk: int, pool_chunk: int) -> int:
    """One pool block and one block of scores: what scoring must hold at once."""
    block_rows = min(pool_chunk, size)
    return (block_rows * dim + min(queries, query_chunk) * block_rows) * BYTES_PER_VALUE


def child(args: argparse.Namespace) -> None:
    """Measures one (pool size, width) in this process; prints the result as JSON."""
    common.set_threads(args.threads)
    size, dim = args.child
    queries = torch.rand(args.queries, dim, generator=torch.Generator().manual_seed(1))
    chunked_top_k(queries, GeneratedPool(min(size, 1000), dim, 1000), args.k)  # warm-up: kernels, allocator
    rss_before = common.peak_rss_mib()
    pool = GeneratedPool(size, dim, args.pool_chunk)
    scoring_seconds: list[float] = []
    while len(scoring_seconds) < args.repeats and sum(scoring_seconds) < args.budget:
        began = time.perf_counter()
        chunked_top_k(queries, pool, args.k, query_chunk=args.query_chunk)
        scoring_seconds.append(time.perf_counter() - began - pool.generation_seconds)
    growth = common.peak_rss_mib() - rss_before
    print(json.dumps({"scoring_seconds": scoring_seconds, "rss_before_mib": rss_before, "growth_mib": growth}))


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for dim in args.dims:
        for size in args.sizes:
            child_args = ["benchmarks.retrieval_scaling", "--child", str(size), str(dim), *_shared_options(args)]
            timed = common.run_fresh_process(*child_args)
            # glibc keeps freed blocks under 32 MiB for reuse, and RSS would show
            # its cache; told to hand every block over 1 MiB back, RSS shows what
            # scoring holds
            held = common.run_fresh_process(*child_args, "--repeats=1", env={"MALLOC_MMAP_THRESHOLD_": str(2**20)})
            working_set = working_set_bytes(size, dim, args.queries, args.query_chunk, args.pool_chunk)
            results.append(
                {
                    "pool_size": size,
                    "dim": dim,
                    "scores_per_second": common.rates(args.queries * size, timed["scoring_seconds"]),
                    "scoring_seconds": common.summarize(timed["scoring_seconds"]),
                    "rss_before_scoring_mib": held["rss_before_mib"],
                    "peak_memory_beyond_inputs_mib": held["growth_mib"],
                    "peak_memory_beyond_inputs_default_malloc_mib": timed["growth_mib"],
                    "working_set_mib": working_set / 2**20,
                    "pool_mib": size * dim * BYTES_PER_VALUE / 2**20,
                }
            )
            print(
                f"pool {size:>9,} x {dim:<5} {common.spread(results[-1]['scores_per_second'], 0)} scores/s", flush=True
            )
    goals = []
    for dim in args.dims:
        by_size = sorted((r for r in results if r["dim"] == dim), key=lambda r: r["pool_size"])
        largest = by_size[-1]
        memory = largest["peak_memory_beyond_inputs_mib"]
        goals.append(
            common.goal(
                f"d={dim}: scoring memory at {largest['pool_size']:,} vectors bounded by one chunk's working set",
                f"<= {MAX_OVER_WORKING_SET:.0f}x {largest['working_set_mib']:.0f} MiB",
                f"{memory:.0f} MiB for a {largest['pool_mib']:,.0f} MiB pool",
                memory <= MAX_OVER_WORKING_SET * largest["working_set_mib"],
            )
        )
        if len(by_size) >= 2:
            smaller = by_size[-2]
            growth = memory / max(smaller["peak_memory_beyond_inputs_mib"], 1.0)
            goals.append(
                common.goal(
                    f"d={dim}: scoring memory flat from {smaller['pool_size']:,} to {largest['pool_size']:,} vectors",
                    f"<= {MAX_MEMORY_GROWTH:.2f}x",
                    f"{growth:.2f}x",
                    growth <= MAX_MEMORY_GROWTH,
                )
            )
    parameters = {
        "pool_sizes": args.sizes,
        "dims": args.dims,
        "queries": args.queries,
        "k": args.k,
        "query_chunk": args.query_chunk,
        "pool_chunk": args.pool_chunk,
        "repeats": args.repeats,
        "budget_seconds": args.budget,
        "threads": args.threads,
        "pool": "streamed: uniform random fp32 blocks generated from a seed (generation time excluded)",
        "memory": "peak RSS of a fresh process minus its peak before scoring, one pass, with "
        "MALLOC_MMAP_THRESHOLD_=1MiB so that freed blocks leave RSS; the default_malloc figure is the timed "
        "run's, under glibc's defaults",
    }
    return {"parameters": parameters, "results": results, "goals": goals}


def _shared_options(args: argparse.Namespace) -> list[str]:
    return [
        f"--queries={args.queries}",
        f"--k={args.k}",
        f"--query-chunk={args.query_chunk}",
        f"--pool-chunk={args.pool_chunk}",
        f"--repeats={args.repeats}",
        f"--budget={args.budget}",
        f"--threads={args.threads}",
    ]


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "pool",
        "d",
        "scores/s (millions)",
        "scoring memory MiB",
        "same, glibc defaults",
        "chunk working set MiB",
        "pool MiB",
    ]
    rows = [
        [
            f"{r['pool_size']:,}",
            str(r["dim"]),
            common.spread({k: v / 1e6 for k, v in r["scores_per_second"].items()}, 0),
            f"{r['peak_memory_beyond_inputs_mib']:.0f}",
            f"{r['peak_memory_beyond_inputs_default_malloc_mib']:.0f}",
            f"{r['working_set_mib']:.0f}",
            f"{r['pool_mib']:,.0f}",
        ]
        for r in document["results"]
    ]
    return headers, rows


def tiny_hidden_size(backbone: Path) -> int:
    return json.loads((backbone / "config.json").read_text())["text_config"]["hidden_size"]


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--backbone", type=Path, default=common.TINY_BACKBONE_DIR, help="for its hidden size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="default: the tiny model's and 1536")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--query-chunk", type=int, default=1024)
    parser.add_argument("--pool-chunk", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=45.0, help="seconds of scoring per size after which to stop")
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.quick:
        args.sizes, args.dims, args.queries, args.pool_chunk, args.repeats = [1000, 5000], [8, 16], 8, 1000, 1
    args.dims = args.dims or [tiny_hidden_size(args.backbone), 1536]
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
