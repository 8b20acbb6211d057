"""Training input at realistic sizes: memory per rank, bytes read per epoch, batches per second.

    python -m benchmarks.training_input

Formatted data is synthesised as the format pipeline writes it: record files
(Arrow IPC) and image files. Records are the bundled sample's M3T rows
tokenized by the tiny backbone's tokenizer (7 turns, every phrasing), with a
new id each; images are 640x480 JPEGs of about 89 KB, which Qwen2-VL's
default pixel budget turns into 391 image tokens, as the format pipeline
would count them.

- Memory: peak RSS of a fresh process that opens 32k and 256k formatted
  conversations and makes 40 batches (one rank of one; 8-conversation
  batches). The images of these two sets repeat 16 JPEGs (records point at
  the same bytes) so that the data stays small; the records are all there.
  Goal: the 256k figure within 5% of the 32k one.
- Bytes read: a set whose every record has its own copy of its image; the
  page cache is emptied of its files (fsync, then POSIX_FADV_DONTNEED), then
  rank 0 of N starts (reads what start-up reads) and reads every record of
  its share of one epoch in the epoch's order; the kernel's count of bytes
  this process read from storage (/proc/self/io read_bytes), over the image
  bytes of the records read. N is each of --read-ranks (2, 8, 32): a rank's
  share shrinks with N, what its start-up reads must not grow.
  Goals: at most 1.5x at 2 ranks, 1.3x at 8, 1.5x at 32.
- Batches per second: batch_loader with 2 worker processes (decoding, the
  image processor, collation) over that set, against what the tiny model
  consumes: full training steps on the same batches in one process, times
  training.launcher.processes_per_node. Goal: at least 3x.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks import common

NAME = "training_input"
MAX_RSS_GROWTH = 1.05
MAX_READ_AMPLIFICATION = {2: 1.5, 8: 1.3, 32: 1.5}  # ranks -> goal; other rank counts: the 2-rank goal
MIN_INPUT_OVER_CONSUMPTION = 3.0
IMAGE_SIZE = (640, 480)
DISTINCT_IMAGES = 16
ROWS_PER_FILE = 5000
QWEN2_VL_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}  # Qwen2-VL-2B's defaults


def jpeg_images(sample_dir: Path, count: int) -> list[bytes]:
    """``count`` 640x480 JPEGs of about 89 KB: the sample's images enlarged, with grain (photo-like entropy)."""
    table = pq.read_table(sample_dir / "M3T_train/M3T.parquet", columns=["qry_image_path"])
    paths = table.column(0).to_pylist()[:count]
    rng = np.random.default_rng(0)
    out = []
    for path in paths:
        image = Image.open(sample_dir / path).convert("RGB").resize(IMAGE_SIZE, Image.Resampling.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.normal(0, 9, (*IMAGE_SIZE[::-1], 3)).astype(np.int16)
        noisy = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        for quality in range(95, 20, -5):  # the highest quality within ~89 KB
            buffer = io.BytesIO()
            noisy.save(buffer, "JPEG", quality=quality)
            if buffer.tell() <= 91_000:
                break
        out.append(buffer.getvalue())
    return out


def base_records(sample_dir: Path, backbone: Path, image_tokens: int) -> list[dict[str, Any]]:
    """The sample's training rows as formatted records (tokenized pieces, no image location yet)."""
    from muco_flow.data import schema
    from muco_flow.data.conversations import FormatConfig
    from muco_flow.data.formatting import TurnTokenizer
    from muco_flow.modeling.backbone import load_processors

    tokenizer, _ = load_processors(str(backbone))
    config = FormatConfig.from_params(common.load_parameters()["format"])
    turn_tokenizer = TurnTokenizer(tokenizer, config)
    rows = pq.read_table(sample_dir / schema.TRAIN_META_FILE).to_pylist()
    return [
        turn_tokenizer.record(f"base-{i}", row[schema.QRY], row[config.target_field], image_tokens)
        for i, row in enumerate(rows)
    ]


def write_formatted(
    out: Path, records: list[dict[str, Any]], images: list[bytes], conversations: int, own_images: bool
) -> int:
    """``conversations`` formatted records under ``out`` (files of ROWS_PER_FILE); returns the image bytes used.

    own_images: every record gets its own copy of its image; otherwise each
    file holds the distinct images once and its records point at them.
    """
    from muco_flow.data import schema
    from muco_flow.data.conversations import FormatConfig
    from muco_flow.data.formatting import CONVERSATIONS_DIR, FORMATTED_SCHEMA, RECORD_BATCH_ROWS
    from muco_flow.data.record_index import INDEX_FILE, scan_record_files

    (out / CONVERSATIONS_DIR).mkdir(parents=True)
    entries, image_bytes = [], 0
    for file_index, start in enumerate(range(0, conversations, ROWS_PER_FILE)):
        rows = range(start, min(conversations, start + ROWS_PER_FILE))
        name = f"part-{file_index:05d}"
        offsets, offset = [], 0
        with open(out / CONVERSATIONS_DIR / f"{name}.images", "wb") as blob:
            for i in rows if own_images else range(len(images)):
                data = images[i % len(images)]
                blob.write(data)
                offsets.append((offset, len(data)))
                offset += len(data)
        batch = []
        for j, i in enumerate(rows):
            at, length = offsets[j if own_images else i % len(images)]
            image_bytes += length
            batch.append(
                records[i % len(records)]
                | {
                    schema.SAMPLE_ID: f"synthetic-{i:09d}",
                    "image_shard": f"shards/{name}.parquet",
                    "image_row": j,
                    "image_offset": at,
                    "image_length": length,
                }
            )
        with (
            pa.OSFile(str(out / CONVERSATIONS_DIR / f"{name}.arrow"), "wb") as sink,
            pa.ipc.new_file(sink, FORMATTED_SCHEMA) as writer,
        ):
            formatted = pa.RecordBatch.from_pylist(batch, schema=FORMATTED_SCHEMA)
            for first in range(0, formatted.num_rows, RECORD_BATCH_ROWS):  # as the format pipeline writes them
                writer.write_batch(formatted.slice(first, RECORD_BATCH_ROWS))
        entries.append(
            {
                "file": f"{CONVERSATIONS_DIR}/{name}.arrow",
                "rows": len(batch),
                "images": f"{CONVERSATIONS_DIR}/{name}.images",
            }
        )
    config = FormatConfig.from_params(common.load_parameters()["format"])
    scan_record_files([out / entry["file"] for entry in entries], list_columns=("part_turns",)).save(out)
    # the format pipeline's manifest, less its checksums (nothing here checks them)
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "ingest_manifest_shards": [],
        "counts": {"samples": conversations, "conversations": conversations},
        "shards": entries,
        "settings": config.settings(),
        "record_index": INDEX_FILE,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return image_bytes


def _batches(directory: Path, backbone: Path, rank: int = 0, world_size: int = 1, batch_size: int = 8):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from muco_flow.modeling.backbone import load_processors
    from muco_flow.training.data import ConversationBatches

    tokenizer, _ = load_processors(str(backbone))
    processor = Qwen2VLImageProcessorPil.from_pretrained(str(backbone), size=QWEN2_VL_PIXELS, local_files_only=True)
    return ConversationBatches.for_tokenizer(
        directory,
        directory,  # the ingest shards: only stage 2 reads images from them
        processor,
        tokenizer,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=0,
    )


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_memory(directory: Path, backbone: Path, steps: int) -> dict[str, Any]:
    """Peak RSS, and its two parts: the process's own memory (anonymous) and mapped file pages (page cache).

    The record files are memory-mapped: pages of them that a rank touched
    count in its RSS, but they are the page cache's, shared by every rank of
    a node and dropped under memory pressure; what the rank itself holds is
    its anonymous memory, sampled after start-up and after every batch.
    """
    batches = _batches(directory, backbone)
    anonymous = [_status_mib("RssAnon")]
    for step in range(steps):
        batches.batch(step)
        anonymous.append(_status_mib("RssAnon"))
    return {
        "peak_rss_mib": common.peak_rss_mib(),
        "peak_anonymous_mib": max(anonymous),
        "file_pages_mib": _status_mib("RssFile"),
        "conversations": batches.conversations,
    }


def _io_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def child_reads(directory: Path, backbone: Path, world_size: int) -> dict[str, Any]:
    for path in (directory / "conversations").iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    before = _io_read_bytes()
    batches = _batches(directory, backbone, rank=0, world_size=world_size)
    records, used = batches.records, 0
    epoch = batches.epoch_batches(0)
    for members in epoch:
        for unit in members[: batches.batch_size]:  # this rank's share, in the epoch's order
            record = records.record(int(batches.unit_record[unit]))
            used += record["image_length"]
    return {"read_bytes": _io_read_bytes() - before, "image_bytes_used": used, "steps": len(epoch)}


def child_throughput(directory: Path, backbone: Path, steps: int, train_steps: int) -> dict[str, Any]:
    from benchmarks import workload
    from muco_flow.training.data import batch_loader

    common.set_threads(1)
    batches = _batches(directory, backbone)
    loader = batch_loader(batches, 0, steps + 2, workers=2)
    next(loader), next(loader)  # the workers started and warm
    began = time.perf_counter()
    made = [parts for (parts,) in (next(loader) for _ in range(steps))]
    loader_seconds = time.perf_counter() - began
    params = common.load_parameters()
    training = params["training"]
    workload.start_process_group()
    engine = workload.training_engine(workload.training_embedder(params, backbone), training)
    workload.training_step(engine, made[0], training)  # warm-up
    step_seconds = []
    for batch in made[1 : 1 + train_steps]:
        began = time.perf_counter()
        workload.training_step(engine, batch, training)
        step_seconds.append(time.perf_counter() - began)
    return {
        "loader_seconds": loader_seconds,
        "loader_steps": steps,
        "batch_size": batches.batch_size,
        "step_seconds": step_seconds,
        "processes_per_node": training["launcher"]["processes_per_node"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sample, backbone = args.sample, args.backbone
    images = jpeg_images(sample, DISTINCT_IMAGES)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from muco_flow.data.formatting import image_token_count

    processor = Qwen2VLImageProcessorPil.from_pretrained(str(backbone), size=QWEN2_VL_PIXELS, local_files_only=True)
    image_tokens = image_token_count(processor, *IMAGE_SIZE)
    records = base_records(sample, backbone, image_tokens)
    results: dict[str, Any] = {
        "image_tokens": image_tokens,
        "jpeg_kib": float(np.mean([len(i) for i in images]) / 1024),
    }
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        memory = []
        for size in args.sizes:
            directory = tmp / f"shared-{size}"
            write_formatted(directory, records, images, size, own_images=False)
            disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            measured = common.run_fresh_process(
                NAME_MODULE, "--backbone", str(backbone), "--child", "memory", str(directory), str(args.steps)
            )
            memory.append({"conversations": size, "disk_mib": disk / 2**20, **measured})
            print(f"{size:>8,} conversations: peak RSS {measured['peak_rss_mib']:.0f} MiB", flush=True)
            shutil.rmtree(directory)
        results["memory"] = memory
        own = tmp / "own-images"
        used = write_formatted(own, records, images, args.read_size, own_images=True)

        def read_epochs() -> list[dict[str, Any]]:
            return [
                common.run_fresh_process(
                    NAME_MODULE, "--backbone", str(backbone), "--child", "reads", str(own), str(ranks)
                )
                | {"ranks": ranks, "conversations": args.read_size, "image_bytes_on_disk": used}
                for ranks in args.read_ranks
            ]

        results["reads"] = reads = read_epochs()
        # the same epochs as data formatted before the record index is read: start-up scans the record files
        manifest = json.loads((own / "manifest.json").read_text())
        (own / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "record_index"}))
        results["reads_without_record_index"] = read_epochs()
        (own / "manifest.json").write_text(json.dumps(manifest))
        speed = common.run_fresh_process(
            NAME_MODULE,
            *("--backbone", str(backbone), "--child", "throughput", str(own)),
            *(str(args.loader_steps), str(args.train_steps)),
        )
        results["throughput"] = speed
    growth = memory[-1]["peak_anonymous_mib"] / memory[0]["peak_anonymous_mib"]
    rss_growth = memory[-1]["peak_rss_mib"] / memory[0]["peak_rss_mib"]
    loader_rate = speed["loader_steps"] * speed["batch_size"] / speed["loader_seconds"]
    step_rate = speed["batch_size"] * speed["processes_per_node"] / float(np.median(speed["step_seconds"]))
    results["rates"] = {
        "loader_conversations_per_second": loader_rate,
        "training_conversations_per_second": step_rate,
        "ratio": loader_rate / step_rate,
    }
    goals = [
        common.goal(
            f"peak memory of a rank's own (anonymous RSS), {memory[-1]['conversations']:,} against "
            f"{memory[0]['conversations']:,} conversations",
            f"<= {MAX_RSS_GROWTH:.2f}x",
            f"{growth:.3f}x ({memory[0]['peak_anonymous_mib']:.0f} -> {memory[-1]['peak_anonymous_mib']:.0f} MiB; "
            f"total RSS with the mapped record files' pages {rss_growth:.3f}x, "
            f"{memory[0]['peak_rss_mib']:.0f} -> {memory[-1]['peak_rss_mib']:.0f} MiB)",
            growth <= MAX_RSS_GROWTH,
        ),
        *(
            common.goal(
                f"bytes read from storage per epoch over image bytes used, rank 0 of {r['ranks']} "
                f"({args.read_size:,} conversations, cold cache)",
                f"<= {MAX_READ_AMPLIFICATION.get(r['ranks'], MAX_READ_AMPLIFICATION[2])}x",
                f"{amplification(r):.3f}x ({r['read_bytes'] / 2**20:.1f} of {r['image_bytes_used'] / 2**20:.1f} MiB)",
                amplification(r) <= MAX_READ_AMPLIFICATION.get(r["ranks"], MAX_READ_AMPLIFICATION[2]),
            )
            for r in reads
        ),
        common.goal(
            "input (2 DataLoader workers) over the tiny model's consumption",
            f">= {MIN_INPUT_OVER_CONSUMPTION}x",
            f"{loader_rate / step_rate:.2f}x ({loader_rate:.1f} against {step_rate:.1f} conversations/s)",
            loader_rate / step_rate >= MIN_INPUT_OVER_CONSUMPTION,
        ),
    ]
    parameters = {
        "sizes": args.sizes,
        "read_size": args.read_size,
        "read_ranks": args.read_ranks,
        "steps": args.steps,
        "loader_steps": args.loader_steps,
        "train_steps": args.train_steps,
        "image_size": IMAGE_SIZE,
        "distinct_images": DISTINCT_IMAGES,
    }
    return {"parameters": parameters, "results": [results], "goals": goals}


NAME_MODULE = f"benchmarks.{NAME}"


def amplification(reads: dict[str, Any]) -> float:
    """Bytes a rank read from storage over the image bytes of the records it used."""
    return reads["read_bytes"] / reads["image_bytes_used"]


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    result = document["results"][0]
    rows = [
        [
            f"{m['conversations']:,} conversations, 40 batches",
            f"peak RSS {m['peak_rss_mib']:.0f} MiB: own (anonymous) {m['peak_anonymous_mib']:.0f} MiB, "
            f"mapped file pages {m['file_pages_mib']:.0f} MiB",
            f"{m['disk_mib']:.0f} MiB",
        ]
        for m in result["memory"]
    ]
    rows += [
        [
            f"{reads['conversations']:,} conversations, one epoch, rank 0 of {reads['ranks']}{without}",
            f"read {reads['read_bytes'] / 2**20:.1f} MiB for {reads['image_bytes_used'] / 2**20:.1f} MiB of images "
            f"({amplification(reads):.2f}x)",
            f"{reads['image_bytes_on_disk'] / 2**20:.0f} MiB",
        ]
        for key, without in (("reads", ""), ("reads_without_record_index", ", no record index (scanned at start-up)"))
        for reads in result.get(key, [])
    ]
    rates = result["rates"]
    rows.append(
        [
            "2 DataLoader workers / tiny model x processes",
            f"{rates['loader_conversations_per_second']:.1f} / {rates['training_conversations_per_second']:.1f} "
            "conversations/s",
            "",
        ]
    )
    return ["workload", "measured", "data on disk"], rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32_768, 262_144])
    parser.add_argument("--read-size", type=int, default=4096)
    parser.add_argument("--read-ranks", type=int, nargs="+", default=[2, 8, 32], help="rank counts to read as rank 0")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--loader-steps", type=int, default=24)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--tmp", default=None, help="where the synthetic data goes (deleted after)")
    parser.add_argument("--sample", type=Path, default=common.SAMPLE_DIR)
    parser.add_argument("--backbone", type=Path, default=common.TINY_BACKBONE_DIR)
    args = parser.parse_args(argv)
    backbone = args.backbone
    if args.child:
        kind, directory, *rest = args.child
        if kind == "memory":
            result = child_memory(Path(directory), backbone, int(rest[0]))
        elif kind == "reads":
            result = child_reads(Path(directory), backbone, int(rest[0]))
        else:
            result = child_throughput(Path(directory), backbone, int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return
    if args.quick:
        args.sizes, args.read_size, args.steps, args.loader_steps, args.train_steps = [512, 1024], 256, 4, 4, 1
    document = run(args)
    common.write_and_print(args.out, NAME, document, table)


if __name__ == "__main__":
    main()
