"""Stage-2 formatting: ingested MMEB-train shards in, token pieces out; conversations assembled per epoch.

As in stage 1 (``formatting.py``), formatting tokenizes every piece a
conversation can be built from, and training assembles each epoch's
conversation from them (``assemble_finetune_sample``), here because the masks
change every epoch. Per side:

- the prefix: TEMPLATE_TRAIN up to its last special token before the answer
  (the user turn, the main ``<|emb|>``, the "rewrite" turn, ``<|im_start|>``);
- the answer's words: piece 0 is the text between that special token and the
  answer ("assistant\\n") with the first word, piece i the word after a space;
  and the two ways a mask can appear (first, or after a space);
- the suffix: from ``<|im_end|>`` after the answer to the auxiliary ``<|emb|>``.

Joining word pieces equals tokenizing the joined text when the tokenizer's
pre-tokenizer splits at those spaces (Qwen2's and the tiny preset's do). Each
sample is checked on four draws (nothing masked, all masked, every other word
masked from the first and from the second word); a sample whose pieces do not
join to the same ids is left out and counted (``samples_dropped_pieces``).
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

from muco_flow.data import mmeb_train, schema
from muco_flow.data.conversations import target_key
from muco_flow.data.formatting import CONVERSATIONS_DIR, UNKNOWN_TURN_TYPE, Conversation, image_token_count
from muco_flow.data.ingest import MANIFEST_FILE
from muco_flow.data.mmeb_train_conversations import (
    EMBEDDINGS,
    FinetuneFormatConfig,
    MaskConfig,
    MaskDraw,
    SamplePlan,
    answer_text,
    answer_words,
    masked_answer,
    negative_conversation,
    plan_sample,
    user_text,
)
from muco_flow.data.mmeb_train_ingest import NEGATIVE_IMAGE_PREFIX, TARGET_IMAGE_PREFIX
from muco_flow.data.record_index import INDEX_FILE, scan_record_files
from muco_flow.data.row_checks import CONTROL_TOKENS
from muco_flow.data.shards import ShardWriter
from muco_flow.modeling import tokens
from muco_flow.modeling.inputs import expand_image_pads

logger = logging.getLogger(__name__)

ids = pa.list_(pa.int32())
# Sides are named by the conversation they build: query_answer_ids are the
# pieces of the *target's* answer text, which the query conversation holds.
FINETUNE_FORMATTED_SCHEMA = pa.schema(
    [
        pa.field(schema.SAMPLE_ID, pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        # the ingest shard row that holds every image of the sample
        pa.field("image_shard", pa.string(), nullable=False),
        pa.field("image_row", pa.int64(), nullable=False),
        pa.field("query_image_tokens", pa.int32(), nullable=False),  # 0: no image
        pa.field("target_image_tokens", pa.int32(), nullable=False),
        pa.field("query_prefix_ids", ids, nullable=False),  # one <|image_pad|> with an image
        pa.field("target_prefix_ids", ids, nullable=False),
        pa.field("query_answer_ids", pa.list_(ids), nullable=False),  # [word]
        pa.field("target_answer_ids", pa.list_(ids), nullable=False),
        pa.field("query_mask_ids", pa.list_(ids), nullable=False),  # [a mask first, a mask after a space]
        pa.field("target_mask_ids", pa.list_(ids), nullable=False),
        pa.field("suffix_ids", ids, nullable=False),
        # [negative]: TEMPLATE_BASE sequences; [] when finetune_format.hard_negatives is false
        pa.field("negative_ids", pa.list_(ids), nullable=False),
        pa.field("negative_image_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("negative_source", pa.list_(pa.int32()), nullable=False),  # index in the shard's neg_*; -1: none
        # the target's text and image as one id (conversations.target_key): the loss masks its repeats
        pa.field("target_key", pa.int64(), nullable=False),
        pa.field("negative_key", pa.list_(pa.int64()), nullable=False),  # [negative]: the same for each
    ]
)
RECORD_COLUMNS = [f.name for f in FINETUNE_FORMATTED_SCHEMA]


class PieceMismatch(ValueError):
    """Joined pieces tokenize differently from the joined text."""


def answer_ids(pieces: list[list[int]], mask_ids: list[list[int]], draw: MaskDraw) -> list[int]:
    """The answer's ids under ``draw``, from its word pieces (as ``masked_answer`` builds the text)."""
    first, later = mask_ids
    if draw.whole:
        return list(first)
    out: list[int] = []
    previous_masked = False
    for i, (piece, masked) in enumerate(zip(pieces, draw.words, strict=True)):
        if masked and previous_masked:
            continue
        out.extend((first if i == 0 else later) if masked else piece)
        previous_masked = masked
    return out


def _check_draws(words: int) -> list[MaskDraw]:
    return [
        MaskDraw(False, (False,) * words),
        MaskDraw(True, ()),
        MaskDraw(False, tuple(i % 2 == 0 for i in range(words))),
        MaskDraw(False, tuple(i % 2 == 1 for i in range(words))),
    ]


@dataclass
class FinetuneTokenizer:
    """Tokenizes a sample's sides into the pieces of FINETUNE_FORMATTED_SCHEMA."""

    tokenizer: PreTrainedTokenizerFast
    config: FinetuneFormatConfig

    def __post_init__(self) -> None:
        self.emb_id = tokens.token_id(self.tokenizer, tokens.EMB_TOKEN)
        self.mask_id = tokens.token_id(self.tokenizer, tokens.MASK_TOKEN)
        self.head, self.middle, self.tail = self.config.templates.train_parts()
        self.suffix_ids = self._ids(self.tail)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def side(self, user: str, answer: str) -> dict[str, Any]:
        """One conversation's pieces: its user text, and the other side's answer text."""
        before = self.head + user + self.middle
        cut = max(before.rfind(tok) + len(tok) for tok in CONTROL_TOKENS if tok in before)
        prefix, lead = before[:cut], before[cut:]
        words = answer_words(answer)
        pieces = self._ids_many([lead + words[0], *(" " + w for w in words[1:])])
        mask_ids = self._ids_many([lead + tokens.MASK_TOKEN, " " + tokens.MASK_TOKEN])
        prefix_ids = self._ids(prefix)
        draws = _check_draws(len(words))
        whole = self._ids_many([before + masked_answer(answer, draw) + self.tail for draw in draws])
        for draw, expected in zip(draws, whole, strict=True):
            if prefix_ids + answer_ids(pieces, mask_ids, draw) + self.suffix_ids != expected:
                raise PieceMismatch(f"the answer {answer!r} does not split into word pieces at its spaces")
        if prefix_ids.count(self.emb_id) + self.suffix_ids.count(self.emb_id) != len(EMBEDDINGS):
            raise ValueError(f"a stage-2 conversation does not hold {len(EMBEDDINGS)} {tokens.EMB_TOKEN}")
        return {"prefix_ids": prefix_ids, "answer_ids": pieces, "mask_ids": mask_ids}

    def _ids_many(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def longest(self, side: dict[str, Any], image_tokens: int) -> int:
        """The most tokens the side's conversation takes, whatever the masks."""
        first, later = (len(m) for m in side["mask_ids"])
        answer = sum(max(len(p), first if i == 0 else later) for i, p in enumerate(side["answer_ids"]))
        return len(side["prefix_ids"]) + max(image_tokens - 1, 0) + max(answer, first) + len(self.suffix_ids)

    def negative(self, text: str, image_tokens: int) -> list[int]:
        ids_ = self._ids(negative_conversation(text, image_tokens > 0, self.config.templates))
        if ids_.count(self.emb_id) != 1:
            raise ValueError(f"a hard negative's sequence does not hold one {tokens.EMB_TOKEN}")
        return ids_


INGESTED_COLUMNS = [
    schema.SAMPLE_ID,
    "dataset",
    mmeb_train.QRY,
    mmeb_train.QRY_SENTENCE,
    mmeb_train.POS_TEXT,
    mmeb_train.POS_SENTENCE,
    mmeb_train.NEG_TEXT,
    "image_width",
    "image_height",
    "pos_image_width",
    "pos_image_height",
    "neg_image_width",
    "neg_image_height",
    f"{TARGET_IMAGE_PREFIX}image_sha256",
    f"{NEGATIVE_IMAGE_PREFIX}image_sha256",
]


def format_record(
    sample: dict[str, Any],
    reference: tuple[str, int],
    tokenizer: FinetuneTokenizer,
    image_processor: Qwen2VLImageProcessorPil,
    counts: Counter[str],
) -> dict[str, Any] | None:
    """One ingested sample's record, or None (counted) if it cannot be formatted within max_length."""
    config = tokenizer.config
    t, short = config.templates, config.image_short_side
    query_tokens = image_token_count(image_processor, sample["image_width"], sample["image_height"], short)
    target_tokens = image_token_count(image_processor, sample["pos_image_width"], sample["pos_image_height"], short)
    query_user = user_text(sample[mmeb_train.QRY], query_tokens > 0, t.image)
    target_user = user_text(sample[mmeb_train.POS_TEXT], target_tokens > 0, t.image)
    query_answer = answer_text(query_user, sample[mmeb_train.QRY_SENTENCE] if query_tokens else None, t)
    target_answer = answer_text(target_user, sample[mmeb_train.POS_SENTENCE] if target_tokens else None, t)
    try:
        query_side = tokenizer.side(query_user, target_answer)
        target_side = tokenizer.side(target_user, query_answer)
    except PieceMismatch as err:
        logger.warning("format: sample %s left out: %s", sample[schema.SAMPLE_ID], err)
        counts["samples_dropped_pieces"] += 1
        return None
    limit = config.max_length
    if tokenizer.longest(query_side, query_tokens) > limit or tokenizer.longest(target_side, target_tokens) > limit:
        counts["samples_dropped_too_long"] += 1
        return None
    negatives: list[tuple[list[int], int, int, int]] = []  # ids, image tokens, source, key
    if config.hard_negatives:
        widths, heights = sample["neg_image_width"], sample["neg_image_height"]
        for i, text in enumerate(sample[mmeb_train.NEG_TEXT]):
            n = image_token_count(image_processor, widths[i], heights[i], short)
            sequence = tokenizer.negative(text, n)
            if len(sequence) + max(n - 1, 0) > limit:
                counts["negatives_dropped_too_long"] += 1
                continue
            negatives.append((sequence, n, i, target_key(text, sample[f"{NEGATIVE_IMAGE_PREFIX}image_sha256"][i])))
        if not negatives:
            # as the loader without negatives: the empty text (src/loader.py lines 258-261, 354-355)
            negatives.append((tokenizer.negative("", 0), 0, -1, target_key("")))
            counts["samples_with_empty_negative"] += 1
    counts["negatives"] += len(negatives)
    return {
        schema.SAMPLE_ID: sample[schema.SAMPLE_ID],
        "dataset": sample["dataset"],
        "image_shard": reference[0],
        "image_row": reference[1],
        "query_image_tokens": query_tokens,
        "target_image_tokens": target_tokens,
        **{f"query_{k}": v for k, v in query_side.items()},
        **{f"target_{k}": v for k, v in target_side.items()},
        "suffix_ids": tokenizer.suffix_ids,
        "negative_ids": [n[0] for n in negatives],
        "negative_image_tokens": [n[1] for n in negatives],
        "negative_source": [n[2] for n in negatives],
        "target_key": target_key(sample[mmeb_train.POS_TEXT], sample[f"{TARGET_IMAGE_PREFIX}image_sha256"]),
        "negative_key": [n[3] for n in negatives],
    }


def format_mmeb_train_shards(
    shards_dir: Path,
    output_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessorPil,
    config: FinetuneFormatConfig,
    batch_rows: int = 512,
) -> dict[str, Any]:
    """Tokenizes every ingested MMEB-train sample; writes record shards and a manifest."""
    shards_dir, output_dir = Path(shards_dir), Path(output_dir)
    ingest_manifest = json.loads((shards_dir / MANIFEST_FILE).read_text())
    if ingest_manifest.get("schema_version") != mmeb_train.SCHEMA_VERSION:
        raise ValueError(
            f"{shards_dir} holds '{ingest_manifest.get('schema_version')}' shards, not MMEB-train "
            f"('{mmeb_train.SCHEMA_VERSION}'); run the finetune_data pipeline's ingest on an MMEB-train snapshot"
        )
    pieces = FinetuneTokenizer(tokenizer, config)
    # Arrow IPC: training memory-maps the records (images stay in the ingest shards)
    writer = ShardWriter(
        output_dir / CONVERSATIONS_DIR, FINETUNE_FORMATTED_SCHEMA, config.rows_per_shard, file_format="arrow"
    )
    counts: Counter[str] = Counter()
    total = ingest_manifest["counts"]["accepted"]
    with tqdm(total=total, desc="format stage 2", unit="sample", disable=total < 2000) as progress:
        for shard in ingest_manifest["shards"]:
            row = 0
            parquet = pq.ParquetFile(shards_dir / shard["file"])
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=INGESTED_COLUMNS):
                records = []
                for offset, sample in enumerate(batch.to_pylist()):
                    record = format_record(sample, (shard["file"], row + offset), pieces, image_processor, counts)
                    if record is not None:
                        records.append(record)
                writer.write(records)
                counts["samples"] += batch.num_rows
                counts["records"] += len(records)
                row += batch.num_rows
                progress.update(batch.num_rows)
    writer.close()
    names = (
        "samples",
        "records",
        "samples_dropped_too_long",
        "samples_dropped_pieces",
        "negatives",
        "negatives_dropped_too_long",
        "samples_with_empty_negative",
    )
    # what a rank's start-up needs of every record (each sample's dataset), before the manifest that completes
    scan_record_files([output_dir / shard["file"] for shard in writer.shards], category_columns=("dataset",)).save(
        output_dir
    )
    manifest = {
        "schema_version": mmeb_train.SCHEMA_VERSION,
        "ingest_manifest_shards": [s["sha256"] for s in ingest_manifest["shards"]],
        "counts": {k: counts[k] for k in names},
        "shards": writer.shards,
        "settings": config.settings(),
        "record_index": INDEX_FILE,
    }
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("format stage 2: %s", manifest["counts"])
    return manifest


@dataclass(frozen=True)
class Stage2Sample:
    """One sample in one epoch: its conversation (two <|emb|> per side) and which negative it holds."""

    conversation: Conversation
    negative: int | None  # index into the record's negative_* lists; None without hard negatives
    plan: SamplePlan


def assemble_finetune_sample(
    record: dict[str, Any], epoch: int, settings: dict[str, Any], image_pad_id: int
) -> Stage2Sample:
    """The sample's sequences in ``epoch`` (images expanded), from a record and the format manifest's settings."""
    # the empty negative of a row without any (source -1) is no draw
    drawn = [i for i, source in enumerate(record["negative_source"]) if source >= 0]
    plan = plan_sample(
        record[schema.SAMPLE_ID],
        len(drawn),
        len(record["query_answer_ids"]),
        len(record["target_answer_ids"]),
        epoch,
        seed=settings["seed"],
        mask=MaskConfig(**settings["mask"]),
    )

    def sequence(side: str, draw: MaskDraw) -> list[int]:
        ids_ = (
            record[f"{side}_prefix_ids"]
            + answer_ids(record[f"{side}_answer_ids"], record[f"{side}_mask_ids"], draw)
            + record["suffix_ids"]
        )
        count = record[f"{side}_image_tokens"]
        return expand_image_pads(ids_, image_pad_id, [count] if count else [])

    negative = drawn[plan.negative] if plan.negative is not None else (0 if record["negative_ids"] else None)
    negative_ids = None
    if negative is not None:
        count = record["negative_image_tokens"][negative]
        negative_ids = expand_image_pads(record["negative_ids"][negative], image_pad_id, [count] if count else [])
    conversation = Conversation(
        conversation_id=record[schema.SAMPLE_ID],
        query_ids=sequence("query", plan.in_query),
        target_ids=[sequence("target", plan.in_target)],
        turn_index=list(range(len(EMBEDDINGS))),
        turn_type=[UNKNOWN_TURN_TYPE] * len(EMBEDDINGS),
        target_key=[record["target_key"]] * len(EMBEDDINGS),
        negative_ids=[negative_ids] if negative_ids is not None else None,
        negative_key=[record["negative_key"][negative]] if negative_ids is not None else None,
    )
    return Stage2Sample(conversation, negative, plan)
