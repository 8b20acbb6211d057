"""Evaluation memory and scoring time as the candidate pool grows, on the real reading path and several ranks.

    python -m benchmarks.evaluation_memory

Memory. For 300k and 3M candidates, an M-BEIR-shaped union pool file is
written (``cand_pool/global/mbeir_union_test_cand_pool.jsonl``: M-BEIR's
fields and dids, about half the candidates with an image path like
``mbeir_images/oven_images/08/oven_05011178.jpg``, captions of 8-24 words and
Wikipedia-like passages of 60-250 words: lines of ~460 bytes on average; the
image files are 256 shared ones, as ``read_pool`` checks each path). A fresh
process reads it with ``read_pool`` (every line checked), encodes it with a
stub encoder (seeded random unit vectors at d=64, a reduced width: the
scoring side is what is measured) into ``EncodedPool`` blocks on disk, which
reads every item back from the file for the pool's key, then ranks every
query's positive in the whole pool (``chunked_positive_ranks``) and takes
each query's top 10 (``chunked_top_k`` over the blocks), as evaluation does.
Reported: the RSS the pool leaves resident after reading, per candidate
(beyond the vectors, which stay on disk), and the process's peak RSS; as in
retrieval_scaling, glibc is told to return freed allocations over 1 MiB
(MALLOC_MMAP_THRESHOLD_) so that RSS shows what is held. Goals: at most 64
bytes per candidate, and the 3M figure within 10% of the 300k one.

Scoring time. A pool of 200k stub vectors (d=256) on disk and 1,024 queries
are scored (every query's positive ranked in the whole pool) by 1 process and
by 2 (gloo; each its half of the queries, ``retrieval.QueryShare``, the
halves gathered), each process with ``--threads`` torch threads; median wall
time of ``--repeats`` runs from the ranks' first barrier to the gathered
ranks. Goal: 2 processes in at most 0.6x the time of 1, with the same ranks.

The files (pools, encoded blocks) are deleted after.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

NAME = "evaluation_memory"
MAX_BYTES_PER_CANDIDATE = 64
MAX_PER_CANDIDATE_GROWTH = 1.10
MAX_SHARED_SCORING_RATIO = 0.6
POOL_FILE = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
IMAGE_FILES = 256
WORDS = ["the", "of", "and", "river", "church", "station", "museum", "village", "painted", "founded", "northern"]


def stub_encoder(dim: int):
    """Seeded random unit vectors, a block's seed drawn from its first item (so a block encodes the same twice)."""

    def encode(items) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(repr(items[0]).encode()))
        return torch.nn.functional.normalize(torch.randn(len(items), dim, generator=generator), dim=1)

    return encode


def write_mbeir_pool(root: Path, size: int, seed: int = 0) -> Path:
    """An M-BEIR-shaped pool file of ``size`` candidates under ``root`` (and the image files it names)."""
    rng = random.Random(seed)
    images = []
    for i in range(IMAGE_FILES):
        dataset = ("oven", "mscoco", "visualnews", "infoseek")[i % 4]
        image = f"mbeir_images/{dataset}_images/{i % 100:02d}/{dataset}_{5011178 + i:08d}.jpg"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        (root / image).write_bytes(b"\xff\xd8 a stand-in; read_pool checks that the file exists")
        images.append(image)
    # texts drawn from a fixed set of realistic lengths: writing 3M distinct ones would take minutes
    captions = [" ".join(rng.choices(WORDS, k=rng.randint(8, 24))) for _ in range(512)]
    passages = [" ".join(rng.choices(WORDS, k=rng.randint(60, 250))) for _ in range(512)]
    path = root / POOL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in range(size):
            kind = row % 10
            if kind < 3:  # an image alone (MSCOCO, VisualNews, Fashion200K)
                txt, img, modality = None, rng.choice(images), "image"
            elif kind < 5:  # an image and its caption or entity text (OVEN, InfoSeek, CIRR)
                txt, img, modality = rng.choice(captions), rng.choice(images), "image,text"
            else:  # a caption or a Wikipedia passage (WebQA, OVEN, InfoSeek texts)
                txt, img, modality = rng.choice(captions if kind < 7 else passages), None, "text"
            record = {
                "txt": txt,
                "img_path": img,
                "modality": modality,
                "did": f"{row % 10}:{row}",
                "src_content": None,
            }
            out.write(json.dumps(record) + "\n")
    return path


def resident_mib() -> float:
    """This process's resident memory now (not its peak)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(size: int, dim: int, queries: int, block_rows: int, root: Path, directory: Path) -> dict[str, Any]:
    from muco_flow.evaluation.encoded_pool import EncodedPool
    from muco_flow.evaluation.mbeir import read_pool
    from muco_flow.evaluation.retrieval import chunked_positive_ranks, chunked_top_k

    common.set_threads(1)
    read_pool(root, root / "warm-up.jsonl", "warm-up")  # every code path of the reader loaded before measuring
    gc.collect()
    before = resident_mib()
    began = time.perf_counter()
    pool = read_pool(root, root / POOL_FILE, "global")
    read_seconds = time.perf_counter() - began
    gc.collect()
    held = resident_mib() - before
    encoded = EncodedPool(directory, pool.items, stub_encoder(dim), key_parts=["stub"], block_rows=block_rows)
    began = time.perf_counter()
    encoded.ensure()
    encode_seconds = time.perf_counter() - began
    generator = torch.Generator().manual_seed(1)
    query_vectors = torch.nn.functional.normalize(torch.randn(queries, dim, generator=generator), dim=1)
    positives = [[int(p)] for p in torch.randint(0, size, (queries,), generator=generator)]
    began = time.perf_counter()
    ranks = chunked_positive_ranks(query_vectors, encoded, positives)
    chunked_top_k(query_vectors, encoded.blocks(), 10)
    return {
        "measure": "memory",
        "candidates": size,
        "resident_bytes_per_candidate": held * 2**20 / size,
        "read_seconds": read_seconds,
        "peak_rss_mib": common.peak_rss_mib(),
        "encode_seconds": encode_seconds,
        "score_seconds": time.perf_counter() - began,
        "median_rank": sorted(r[0] for r in ranks)[len(ranks) // 2],
        "pool_file_mib": (root / POOL_FILE).stat().st_size / 2**20,
        "pool_mib": size * dim * 4 / 2**20,
    }


def scoring_child(rank: int, ranks: int, port: int, size: int, dim: int, queries: int, directory: Path) -> None:
    """One of ``ranks`` processes scoring its share of the queries; rank 0 prints the time and the ranks' digest."""
    import torch.distributed as dist

    from muco_flow.evaluation.encoded_pool import EncodedPool
    from muco_flow.evaluation.retrieval import QueryShare, chunked_positive_ranks

    pool = EncodedPool(directory, range(size), stub_encoder(dim), key_parts=["stub"], block_rows=32768)
    generator = torch.Generator().manual_seed(2)
    query_vectors = torch.nn.functional.normalize(torch.randn(queries, dim, generator=generator), dim=1)
    positives = [[int(p)] for p in torch.randint(0, size, (queries,), generator=generator)]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)

    def gather(mine: Any) -> list[Any]:
        parts: list[Any] = [None] * ranks
        dist.all_gather_object(parts, mine)
        return parts

    share = QueryShare(rank, ranks, gather)
    part = share.part(queries)
    dist.barrier()
    began = time.perf_counter()
    ranked = share.merged(chunked_positive_ranks(query_vectors[part], pool, positives[part]))
    seconds = time.perf_counter() - began
    dist.destroy_process_group()
    if rank == 0:
        digest = hashlib.sha256(json.dumps(ranked).encode()).hexdigest()[:16]
        print(json.dumps({"seconds": seconds, "ranks_digest": digest, "queries": len(ranked)}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def time_scoring(ranks: int, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """One run of ``ranks`` scoring processes: rank 0's seconds and ranks' digest."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sizes = (str(args.scoring_size), str(args.scoring_dim), str(args.scoring_queries), str(directory))
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{NAME}", "--scoring-child", str(r), str(ranks), str(port), *sizes],
            cwd=common.PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(ranks)
    ]
    outputs = [p.communicate() for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"a scoring process failed:\n{stderr[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def scoring(args: argparse.Namespace) -> list[dict[str, Any]]:
    from muco_flow.evaluation.encoded_pool import EncodedPool

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        pool = EncodedPool(
            tmp, range(args.scoring_size), stub_encoder(args.scoring_dim), key_parts=["stub"], block_rows=32768
        )
        pool.ensure()
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for _ in range(args.repeats):  # alternating, so that a busy spell of the machine falls on both
            for ranks in runs:
                runs[ranks].append(time_scoring(ranks, args, Path(tmp)))
    return [
        {
            "measure": "scoring",
            "processes": ranks,
            "candidates": args.scoring_size,
            "seconds": common.summarize([r["seconds"] for r in measured]),
            "ranks_digests": sorted({r["ranks_digest"] for r in measured}),
        }
        for ranks, measured in runs.items()
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    memory = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            root = Path(tmp)
            write_mbeir_pool(root, size)
            with (root / POOL_FILE).open("rb") as lines:  # the child's warm-up: the pool's first 10 lines
                (root / "warm-up.jsonl").write_bytes(b"".join(itertools.islice(lines, 10)))
            measured = common.run_fresh_process(
                f"benchmarks.{NAME}",
                *("--child", str(size), str(args.dim), str(args.queries), str(args.block_rows), tmp, f"{tmp}/blocks"),
                env={"MALLOC_MMAP_THRESHOLD_": str(2**20)},
            )
        memory.append(measured)
        print(f"{size:>10,} candidates: {measured['resident_bytes_per_candidate']:.1f} B each", flush=True)
    timed = scoring(args)
    goals = [
        *(
            common.goal(
                f"candidate metadata resident per candidate, {r['candidates']:,} M-BEIR-shaped candidates "
                "(read_pool, beyond the vectors)",
                f"<= {MAX_BYTES_PER_CANDIDATE} B",
                f"{r['resident_bytes_per_candidate']:.1f} B",
                r["resident_bytes_per_candidate"] <= MAX_BYTES_PER_CANDIDATE,
            )
            for r in memory
        ),
        common.goal(
            f"resident bytes per candidate, {memory[-1]['candidates']:,} against {memory[0]['candidates']:,}",
            f"<= {MAX_PER_CANDIDATE_GROWTH:.2f}x",
            f"{memory[-1]['resident_bytes_per_candidate'] / memory[0]['resident_bytes_per_candidate']:.3f}x",
            memory[-1]["resident_bytes_per_candidate"]
            <= MAX_PER_CANDIDATE_GROWTH * memory[0]["resident_bytes_per_candidate"],
        ),
    ]
    one, two = (r for r in timed if r["measure"] == "scoring")
    ratio = two["seconds"]["median"] / one["seconds"]["median"]
    same = one["ranks_digests"] == two["ranks_digests"] and len(one["ranks_digests"]) == 1
    goals.append(
        common.goal(
            f"scoring {args.scoring_queries:,} queries against {args.scoring_size:,} candidates, 2 processes against 1",
            f"<= {MAX_SHARED_SCORING_RATIO}x, the same ranks",
            f"{ratio:.2f}x (median {one['seconds']['median']:.2f} -> {two['seconds']['median']:.2f} s), "
            f"{'the same ranks' if same else 'DIFFERENT ranks'}",
            ratio <= MAX_SHARED_SCORING_RATIO and same,
        )
    )
    parameters = {
        "sizes": args.sizes,
        "dim": args.dim,
        "queries": args.queries,
        "block_rows": args.block_rows,
        "scoring_size": args.scoring_size,
        "scoring_dim": args.scoring_dim,
        "scoring_queries": args.scoring_queries,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    return {"parameters": parameters, "results": [*memory, *timed], "goals": goals}


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for r in document["results"]:
        if r["measure"] == "memory":
            rows.append(
                [
                    f"read_pool + score, {r['candidates']:,} candidates ({r['pool_file_mib']:.0f} MiB file)",
                    f"{r['resident_bytes_per_candidate']:.1f}",
                    f"{r['peak_rss_mib']:.0f}",
                    f"read {r['read_seconds']:.0f}, encode {r['encode_seconds']:.0f}, score {r['score_seconds']:.0f}",
                ]
            )
        else:
            rows.append(
                [
                    f"scoring on {r['processes']} process{'es' if r['processes'] > 1 else ''}",
                    "",
                    "",
                    f"{common.spread(r['seconds'], 2)} (n={r['seconds']['repeats']})",
                ]
            )
    return ["measurement", "resident B/candidate", "peak RSS MiB", "seconds"], rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--scoring-child", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[300_000, 3_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--block-rows", type=int, default=32768)
    parser.add_argument("--scoring-size", type=int, default=200_000)
    parser.add_argument("--scoring-dim", type=int, default=256)
    parser.add_argument("--scoring-queries", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="where the pools and their encodings go (deleted after)")
    args = parser.parse_args(argv)
    if args.child:
        size, dim, queries, block_rows, root, directory = args.child
        print(json.dumps(child(int(size), int(dim), int(queries), int(block_rows), Path(root), Path(directory))))
        return
    if args.scoring_child:
        rank, ranks, port, size, dim, queries, directory = args.scoring_child
        common.set_threads(args.threads)
        scoring_child(int(rank), int(ranks), int(port), int(size), int(dim), int(queries), Path(directory))
        return
    if args.quick:
        args.sizes, args.dim, args.queries, args.block_rows = [2000, 10000], 16, 16, 1000
        args.scoring_size, args.scoring_dim, args.scoring_queries, args.repeats = 5000, 16, 64, 1
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
