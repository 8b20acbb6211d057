"""Formatting: ingested shards in, tokenized turns out; conversations assembled per epoch.

Formatting tokenizes every piece a conversation can be built from: each
phrasing of each turn both as the first turn (with the image) and as a later
one, and each target. Training then assembles the epoch's conversation from
these pieces (``assemble_conversations``), so the turn order and phrasings can
change every epoch without tokenizing again. Pieces end at special tokens,
so joining their ids equals tokenizing the joined text.

Records keep a reference to their image (ingest shard and row) rather than a
copy; the image's token count is fixed here, from its size.
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
from muco_flow.data.shards import ShardWriter
from muco_flow.modeling import tokens
from muco_flow.modeling.inputs import short_side_size

CONVERSATIONS_DIR = "conversations"
UNKNOWN_TURN_TYPE = -1

ids = pa.list_(pa.int32())
FORMATTED_SCHEMA = pa.schema(
    [
        pa.field(schema.SAMPLE_ID, pa.string(), nullable=False),
        pa.field("image_shard", pa.string()),  # null: a sample without an image
        pa.field("image_row", pa.int64()),
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
    image_processor: Qwen2VLImageProcessorPil, width: int, height: int, short_side: int | None = None
) -> int:
    """LLM tokens the image takes: its patch grid after the short-side resize and Qwen2-VL's own, merged."""
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
        self.emb_id = self.tokenizer.convert_tokens_to_ids(tokens.EMB_TOKEN)
        if self.emb_id == self.tokenizer.unk_token_id or self.emb_id is None:
            raise ValueError(f"the tokenizer has no {tokens.EMB_TOKEN} token; add MuCo's tokens to the backbone first")
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


def format_m3t_shards(
    shards_dir: Path,
    output_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessorPil,
    config: FormatConfig,
    batch_rows: int = 512,
) -> dict[str, Any]:
    """Tokenizes every ingested sample; writes record shards and a manifest."""
    shards_dir, output_dir = Path(shards_dir), Path(output_dir)
    ingest_manifest = json.loads((shards_dir / MANIFEST_FILE).read_text())
    turn_tokenizer = TurnTokenizer(tokenizer, config)
    writer = ShardWriter(output_dir / CONVERSATIONS_DIR, FORMATTED_SCHEMA, config.rows_per_shard)
    counts: Counter[str] = Counter()
    columns = [schema.SAMPLE_ID, schema.QRY, config.target_field, "image_width", "image_height"]
    columns += [schema.NEG_TEXT] if config.hard_negatives else []
    total = ingest_manifest["counts"]["accepted"]
    with tqdm(total=total, desc="format", unit="sample", disable=total < 2000) as progress:
        for shard in ingest_manifest["shards"]:
            row = 0
            for batch in pq.ParquetFile(shards_dir / shard["file"], page_checksum_verification=True).iter_batches(
                batch_size=batch_rows, columns=columns
            ):
                records = []
                for offset, sample in enumerate(batch.to_pylist()):
                    has_image = sample["image_width"] is not None
                    n_image = (
                        image_token_count(
                            image_processor, sample["image_width"], sample["image_height"], config.image_short_side
                        )
                        if has_image
                        else 0
                    )
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
                    kept = sum(parts)
                    counts["turns"] += len(qry)
                    counts["turns_dropped"] += len(qry) - kept
                    counts["conversations"] += sum(1 for n in parts if n)
                    counts["conversations_dropped"] += sum(1 for n in parts if not n)
                    if not kept:
                        continue
                    reference = (shard["file"], row + offset) if has_image else (None, None)
                    records.append(record | dict(zip(("image_shard", "image_row"), reference, strict=True)))
                writer.write(records)
                counts["samples"] += batch.num_rows
                row += batch.num_rows
                progress.update(batch.num_rows)
    writer.close()
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "ingest_manifest_shards": [s["sha256"] for s in ingest_manifest["shards"]],
        "counts": {
            k: counts[k] for k in ("samples", "conversations", "conversations_dropped", "turns", "turns_dropped")
        },
        "shards": writer.shards,
        "settings": config.settings(),
    }
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    logging.getLogger(__name__).info("format: %s", manifest["counts"])
    return manifest


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
