"""Formatting: ingested shards in, tokenized turns out; conversations assembled per epoch.

Formatting tokenizes every piece a conversation can be built from: each
phrasing of each turn both as the first turn (with the image) and as a later
one, and each target. Training then assembles the epoch's conversation from
these pieces (``assemble_conversations``), so the turn order and phrasings can
change every epoch without tokenizing again. Pieces end at special tokens,
so joining their ids equals tokenizing the joined text.

Each ingest shard becomes one record file, ``conversations/<shard>.arrow``
(uncompressed Arrow IPC, which training memory-maps instead of loading), and
one image file, ``<shard>.images``: the shard's image bytes back to back, which
training reads with one positioned read per image (``image_offset``,
``image_length``) instead of a whole Parquet row group. ``image_shard`` and
``image_row`` still name where the image was ingested. The image's token
count is fixed here, from its size.

Ingest shards are independent units of work: ``format_m3t_part`` formats every
``num_parts``-th of them on ``num_workers`` processes (a SLURM array task or a
torchrun node per part), and ``merge_format_parts`` writes the one manifest.
``format_m3t_shards`` is both on one machine. The files do not depend on how
the work was split.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.data import schema
from muco_flow.data.conversations import (
    FormatConfig,
    part_turns,
    plan_turns,
    query_turn_content,
    render_turn,
    target_key,
    target_turn_content,
)
from muco_flow.data.ingest import MANIFEST_FILE
from muco_flow.data.parallel import check_part, map_in_processes, part_stem, worker_state
from muco_flow.data.record_index import INDEX_FILE, scan_record_files
from muco_flow.data.sources import file_sha256
from muco_flow.modeling import tokens
from muco_flow.modeling.image_sizing import short_side_size

CONVERSATIONS_DIR = "conversations"
RECORD_FILE_SUFFIX = ".arrow"
IMAGE_FILE_SUFFIX = ".images"
# Rows per Arrow record batch. One: a record's columns then lie together in its own few pages, so a rank
# reading its share of an epoch reads those pages and not its neighbours' (a 512-row batch spreads one record
# over ~35 column buffers, a page or more each: 1.8x the image bytes read at 8 ranks, 4x at 32)
RECORD_BATCH_ROWS = 1
INGEST_READ_ROWS = 512  # rows read from an ingest shard at a time
PARTS_DIR = "format-parts"  # each part's summary, until the merge
UNKNOWN_TURN_TYPE = -1

ids = pa.list_(pa.int32())
FORMATTED_SCHEMA = pa.schema(
    [
        pa.field(schema.SAMPLE_ID, pa.string(), nullable=False),
        pa.field("image_shard", pa.string()),  # null: a sample without an image
        pa.field("image_row", pa.int64()),
        # where the image's bytes are in the record file's image file (null: no image)
        pa.field("image_offset", pa.int64()),
        pa.field("image_length", pa.int64()),
        pa.field("image_tokens", pa.int32(), nullable=False),  # 0 without an image
        pa.field("turn_type", pa.list_(pa.int8()), nullable=False),  # per M3T turn
        pa.field("system_ids", ids, nullable=False),
        # [turn][phrasing]: the turn when it comes first (one <|image_pad|>, expanded when assembled) ...
        pa.field("query_first_ids", pa.list_(pa.list_(ids)), nullable=False),
        # ... and when it comes later (separator first, no image)
        pa.field("query_later_ids", pa.list_(pa.list_(ids)), nullable=False),
        pa.field("target_ids", pa.list_(ids), nullable=False),  # [turn], without the system block
        pa.field("separator_ids", ids, nullable=False),
        pa.field("target_key", pa.list_(pa.int64()), nullable=False),
        # [turn]: neg_text as one-turn pieces like the targets (empty unless format.hard_negatives)
        pa.field("negative_ids", pa.list_(ids), nullable=False),
        pa.field("negative_key", pa.list_(pa.int64()), nullable=False),
        # turns in each of the sample's conversations, at most what fits max_length for any draw
        pa.field("part_turns", pa.list_(pa.int32()), nullable=False),
    ]
)


def image_token_count(
    image_processor: Qwen2VLImageProcessorPil, width: int | None, height: int | None, short_side: int | None = None
) -> int:
    """LLM tokens the image takes: its patch grid after the short-side resize and Qwen2-VL's own, merged.

    0 for no image (a shard row without one has null sizes).
    """
    if width is None or height is None:
        return 0
    width, height = short_side_size(width, height, short_side)
    patches = image_processor.get_number_of_image_patches(height, width, {})
    return patches // image_processor.merge_size**2


def _top_sum(values: list[int], n: int) -> int:
    return sum(sorted(values, reverse=True)[:n])


@dataclass
class TurnTokenizer:
    """Tokenizes a sample's turns into the pieces of FORMATTED_SCHEMA."""

    tokenizer: PreTrainedTokenizerFast
    config: FormatConfig

    def __post_init__(self) -> None:
        t = self.config.templates
        self.emb_id = tokens.token_id(self.tokenizer, tokens.EMB_TOKEN)
        self.system_ids = self._ids(t.system)
        self.separator_ids = self._ids(t.turn_separator)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenize(
        self,
        sample_id: str,
        qry: list[list[str]],
        targets: list[str],
        has_image: bool,
        negatives: list[str] | None = None,
    ) -> dict[str, Any]:
        t = self.config.templates
        negatives = negatives or []
        newline = self.config.user_text_newline

        def rendered(text: str, first: bool) -> str:
            return render_turn(query_turn_content(text, first, has_image, t.image), t, first=first, newline=newline)

        first = [[rendered(p, True) for p in phrasings] for phrasings in qry]
        later = [[rendered(p, False) for p in phrasings] for phrasings in qry]
        target_texts = [
            render_turn(target_turn_content(x), t, first=True, newline=newline) for x in targets + negatives
        ]
        flat = [text for turn in first + later for text in turn] + target_texts
        encoded = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"])
        first_ids = [[next(encoded) for _ in turn] for turn in first]
        later_ids = [[next(encoded) for _ in turn] for turn in later]
        target_ids = [next(encoded) for _ in targets]
        negative_ids = [next(encoded) for _ in negatives]
        query_pieces = [i for turn in first_ids + later_ids for i in turn]
        for name, pieces in (("query", query_pieces), ("target", target_ids), ("hard negative", negative_ids)):
            if any(piece.count(self.emb_id) != 1 for piece in pieces):
                raise ValueError(
                    f"sample {sample_id}: a {name} turn does not hold exactly one {tokens.EMB_TOKEN}; "
                    "the templates or the text hold extra ones"
                )
        return {
            schema.SAMPLE_ID: sample_id,
            "system_ids": self.system_ids,
            "query_first_ids": first_ids,
            "query_later_ids": later_ids,
            "target_ids": target_ids,
            "separator_ids": self.separator_ids,
            "target_key": [target_key(x) for x in targets],
            "negative_ids": negative_ids,
            "negative_key": [target_key(x) for x in negatives],
        }

    def record(
        self,
        sample_id: str,
        qry: list[list[str]],
        targets: list[str],
        image_tokens: int,
        negatives: list[str] | None = None,
    ) -> dict[str, Any]:
        """A sample's formatted record, less the reference to its image."""
        record = self.tokenize(sample_id, qry, targets, image_tokens > 0, negatives)
        types = schema.M3T_TURN_TYPES if len(qry) == len(schema.M3T_TURN_TYPES) else None
        fitting = self.fitting_turns(record, image_tokens)
        return record | {
            "image_tokens": image_tokens,
            "turn_type": [int(types[k]) if types else UNKNOWN_TURN_TYPE for k in range(len(qry))],
            "part_turns": part_turns(len(qry), self.config.chunk_size, fitting),
        }

    def fitting_turns(self, record: dict[str, Any], image_tokens: int) -> int:
        """The most turns per conversation that fit ``max_length`` whatever order and phrasings are drawn."""
        limit, system = self.config.max_length, len(self.system_ids)
        first = max(len(p) for turn in record["query_first_ids"] for p in turn)
        later = [max(len(p) for p in turn) for turn in record["query_later_ids"]]
        # a hard negative is a one-turn sequence of its own, as an independent target
        negative = max((len(x) for x in record["negative_ids"]), default=0)
        targets = [len(x) for x in record["target_ids"]]
        independent = self.config.target_layout == "independent"
        image = max(image_tokens - 1, 0)  # the one <|image_pad|> is already counted
        best = 0
        for m in range(1, len(later) + 1):
            query = system + image + first + _top_sum(later, m - 1)
            target = (
                system + max(targets)
                if independent
                else system + _top_sum(targets, m) + (m - 1) * len(self.separator_ids)
            )
            if query > limit or target > limit or system + negative > limit:
                break
            best = m
        return best


COUNT_NAMES = ("samples", "conversations", "conversations_dropped", "turns", "turns_dropped")


def format_ingest_shard(
    shard: dict[str, Any],
    shards_dir: Path,
    output_dir: Path,
    turn_tokenizer: TurnTokenizer,
    image_processor: Qwen2VLImageProcessorPil,
    batch_rows: int = INGEST_READ_ROWS,
) -> dict[str, Any]:
    """Formats one ingest shard into its record file and image file; returns their manifest entry and counts."""
    config = turn_tokenizer.config
    stem = Path(shard["file"]).stem
    directory = Path(output_dir) / CONVERSATIONS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    record_path, image_path = directory / f"{stem}{RECORD_FILE_SUFFIX}", directory / f"{stem}{IMAGE_FILE_SUFFIX}"
    counts: Counter[str] = Counter()
    columns = [schema.SAMPLE_ID, schema.QRY, config.target_field, "image_width", "image_height", "image_bytes"]
    columns += [schema.NEG_TEXT] if config.hard_negatives else []
    parquet = pq.ParquetFile(Path(shards_dir) / shard["file"], page_checksum_verification=True)
    row = image_offset = 0
    with (
        pa.OSFile(str(record_path), "wb") as sink,
        pa.ipc.new_file(sink, FORMATTED_SCHEMA) as writer,
        open(image_path, "wb") as images,
    ):
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            records = []
            for offset, sample in enumerate(batch.to_pylist()):
                record = _format_sample(sample, turn_tokenizer, image_processor, counts)
                if record is None:
                    continue
                reference = dict.fromkeys(("image_shard", "image_row", "image_offset", "image_length"))
                if sample["image_width"] is not None:
                    data = sample["image_bytes"]
                    images.write(data)
                    reference = {
                        "image_shard": shard["file"],
                        "image_row": row + offset,
                        "image_offset": image_offset,
                        "image_length": len(data),
                    }
                    image_offset += len(data)
                records.append(record | reference)
            if records:
                formatted = pa.RecordBatch.from_pylist(records, schema=FORMATTED_SCHEMA)
                for first in range(0, formatted.num_rows, RECORD_BATCH_ROWS):
                    writer.write_batch(formatted.slice(first, RECORD_BATCH_ROWS))
            counts["samples"] += batch.num_rows
            counts["records"] += len(records)
            row += batch.num_rows
    entry = {
        "file": f"{CONVERSATIONS_DIR}/{record_path.name}",
        "rows": counts["records"],
        "sha256": file_sha256(record_path),
        "images": f"{CONVERSATIONS_DIR}/{image_path.name}",
        "images_sha256": file_sha256(image_path),
        "ingest_shard": shard["file"],
    }
    return {"entry": entry, "counts": {name: counts[name] for name in COUNT_NAMES}}


def _format_sample(
    sample: dict[str, Any],
    turn_tokenizer: TurnTokenizer,
    image_processor: Qwen2VLImageProcessorPil,
    counts: Counter[str],
) -> dict[str, Any] | None:
    """The sample's record, less where its image is; None (counted) when no turn fits."""
    config = turn_tokenizer.config
    n_image = image_token_count(image_processor, sample["image_width"], sample["image_height"], config.image_short_side)
    qry, targets = sample[schema.QRY], sample[config.target_field]
    negatives = None
    if config.hard_negatives:
        negatives = sample[schema.NEG_TEXT]
        if not negatives:
            raise ValueError(
                f"format.hard_negatives is set but sample {sample[schema.SAMPLE_ID]} has no neg_text; "
                "set format.hard_negatives: false or ingest a snapshot with neg_text"
            )
    record = turn_tokenizer.record(sample[schema.SAMPLE_ID], qry, targets, n_image, negatives)
    parts = record["part_turns"]
    counts["turns"] += len(qry)
    # dropped: what max_length leaves out; conversations past conversations_per_sample are not
    # dropped, as each epoch's draw of the turn order puts other turns into the ones kept
    counts["turns_dropped"] += len(qry) - sum(parts)
    counts["conversations_dropped"] += sum(1 for n in parts if not n)
    kept = parts[: turn_tokenizer.config.conversations_per_sample]
    counts["conversations"] += sum(1 for n in kept if n)
    return record | {"part_turns": kept} if sum(kept) else None


def _format_shard_in_worker(shard: dict[str, Any]) -> dict[str, Any]:
    state = worker_state()
    return format_ingest_shard(
        shard, state["shards_dir"], state["output_dir"], state["turn_tokenizer"], state["image_processor"]
    )


def _part_summary_path(output_dir: Path, part_index: int, num_parts: int) -> Path:
    return Path(output_dir) / PARTS_DIR / f"{part_stem(part_index, num_parts)}.json"


def format_m3t_part(
    shards_dir: Path,
    output_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessorPil,
    config: FormatConfig,
    *,
    part_index: int = 0,
    num_parts: int = 1,
) -> dict[str, Any]:
    """Formats ingest shards ``part_index``, ``part_index + num_parts``, ... on ``config.num_workers`` processes.

    Writes their files and a part summary that ``merge_format_parts`` reads.
    """
    check_part("format", part_index, num_parts)
    shards_dir, output_dir = Path(shards_dir), Path(output_dir)
    ingest_manifest = json.loads((shards_dir / MANIFEST_FILE).read_text())
    mine = ingest_manifest["shards"][part_index::num_parts]
    state = {
        "shards_dir": shards_dir,
        "output_dir": output_dir,
        "turn_tokenizer": TurnTokenizer(tokenizer, config),
        "image_processor": image_processor,
    }
    done = []
    rows = sum(shard["rows"] for shard in mine)
    with tqdm(total=rows, desc="format", unit="sample", disable=rows < 2000) as progress:
        for result in map_in_processes(_format_shard_in_worker, mine, config.num_workers, state):
            done.append(result)
            progress.update(result["counts"]["samples"])
    summary = {
        "part_index": part_index,
        "num_parts": num_parts,
        "ingest_manifest_shards": [s["sha256"] for s in ingest_manifest["shards"]],
        "settings": config.settings(),
        "shards": done,
    }
    path = _part_summary_path(output_dir, part_index, num_parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def merge_format_parts(shards_dir: Path, output_dir: Path, num_parts: int) -> dict[str, Any]:
    """The format manifest from every part's summary: each ingest shard formatted once, with the same settings."""
    shards_dir, output_dir = Path(shards_dir), Path(output_dir)
    ingest_manifest = json.loads((shards_dir / MANIFEST_FILE).read_text())
    ingested = [s["sha256"] for s in ingest_manifest["shards"]]
    summaries = []
    for index in range(num_parts):
        path = _part_summary_path(output_dir, index, num_parts)
        if not path.is_file():
            raise ValueError(f"format part {index} of {num_parts} has not finished: no {path}; run it first")
        summaries.append(json.loads(path.read_text()))
    for summary in summaries:
        if summary["ingest_manifest_shards"] != ingested:
            raise ValueError(
                f"format part {summary['part_index']} of {num_parts} was run on other ingest shards than those in "
                f"{shards_dir} now; run it again"
            )
        if summary["settings"] != summaries[0]["settings"]:
            raise ValueError(
                f"format parts 0 and {summary['part_index']} were run with other format settings; "
                "run every part with the same parameters"
            )
    by_shard = {result["entry"]["ingest_shard"]: result for summary in summaries for result in summary["shards"]}
    missing = [shard["file"] for shard in ingest_manifest["shards"] if shard["file"] not in by_shard]
    if missing:
        raise ValueError(f"no format part formatted {len(missing)} ingest shards, e.g. {missing[0]}")
    results = [by_shard[shard["file"]] for shard in ingest_manifest["shards"]]
    counts = {name: sum(result["counts"][name] for result in results) for name in COUNT_NAMES}
    if counts["samples"] != ingest_manifest["counts"]["accepted"]:
        raise ValueError(
            f"the format parts read {counts['samples']} samples, but ingest accepted "
            f"{ingest_manifest['counts']['accepted']}"
        )
    # what a rank's start-up needs of every record (each conversation's turns), before the manifest that completes
    scan_record_files([output_dir / result["entry"]["file"] for result in results], list_columns=("part_turns",)).save(
        output_dir
    )
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "ingest_manifest_shards": ingested,
        "counts": counts,
        "shards": [result["entry"] for result in results],
        "settings": summaries[0]["settings"],
        "record_index": INDEX_FILE,
    }
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    for index in range(num_parts):
        _part_summary_path(output_dir, index, num_parts).unlink()
    (output_dir / PARTS_DIR).rmdir()
    logging.getLogger(__name__).info("format: %s", counts)
    return manifest


def format_m3t_shards(
    shards_dir: Path,
    output_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessorPil,
    config: FormatConfig,
) -> dict[str, Any]:
    """Tokenizes every ingested sample on this machine (``config.num_workers`` processes); writes the manifest."""
    format_m3t_part(shards_dir, output_dir, tokenizer, image_processor, config)
    return merge_format_parts(shards_dir, output_dir, 1)


@dataclass(frozen=True)
class Conversation:
    """One conversation of one epoch, as token ids (the image's tokens expanded)."""

    conversation_id: str
    query_ids: list[int]
    target_ids: list[list[int]]  # one row per target (independent layout) or one row for all
    turn_index: list[int]  # M3T turn of each position
    turn_type: list[int]
    target_key: list[int]
    # hard negatives' one-turn sequences: one per turn (stage 1) or one per sample (stage 2)
    negative_ids: list[list[int]] | None = None
    negative_key: list[int] | None = None  # stage 1: the negatives' texts as target_key


def assemble_conversations(
    record: dict[str, Any], epoch: int, settings: dict[str, Any], image_pad_id: int
) -> list[Conversation]:
    """The sample's conversations in ``epoch``, from a formatted record and the format manifest's settings."""
    sample_id = record[schema.SAMPLE_ID]
    plan = plan_turns(
        sample_id,
        [len(turn) for turn in record["query_first_ids"]],
        epoch,
        seed=settings["seed"],
        shuffle=settings["shuffle_turns"],
        resample=settings["resample_each_epoch"],
    )
    size = 1 if settings["mode"] == "single_turn" else settings["turns_per_conversation"] or len(plan.order)
    independent = settings["target_layout"] == "independent"
    system, separator = record["system_ids"], record["separator_ids"]
    conversations = []
    for part, kept in enumerate(record["part_turns"]):
        if not kept:
            continue
        chosen = list(range(part * size, part * size + kept))
        turns = [plan.order[i] for i in chosen]
        query = list(system)
        for position, (k, p) in enumerate(zip(turns, (plan.phrasing[i] for i in chosen), strict=True)):
            piece = record["query_first_ids"][k][p] if position == 0 else record["query_later_ids"][k][p]
            query.extend(piece)
        query = _expand_image(query, image_pad_id, record["image_tokens"])
        if independent:
            targets = [system + record["target_ids"][k] for k in turns]
        else:
            joined = list(system)
            for position, k in enumerate(turns):
                joined.extend((separator if position else []) + record["target_ids"][k])
            targets = [joined]
        negatives = settings.get("hard_negatives") and record["negative_ids"]
        conversations.append(
            Conversation(
                conversation_id=f"{sample_id}#{part}",
                query_ids=query,
                target_ids=targets,
                turn_index=turns,
                turn_type=[record["turn_type"][k] for k in turns],
                target_key=[record["target_key"][k] for k in turns],
                negative_ids=[system + record["negative_ids"][k] for k in turns] if negatives else None,
                negative_key=[record["negative_key"][k] for k in turns] if negatives else None,
            )
        )
    return conversations


def _expand_image(ids: list[int], image_pad_id: int, count: int) -> list[int]:
    pads = ids.count(image_pad_id)
    if pads != (1 if count else 0):
        raise ValueError(f"a conversation holds {pads} <|image_pad|> tokens for {'one image' if count else 'no image'}")
    if not count:
        return ids
    at = ids.index(image_pad_id)
    return ids[:at] + [image_pad_id] * count + ids[at + 1 :]
