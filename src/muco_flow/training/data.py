"""Training batches from formatted conversations.

A global step maps to one batch through a seeded per-epoch shuffle, so the
data position of a resumed run is just its step. Each batch holds
conversations with the same number of turns K (the loss's B*K layout needs
it) and the same number B on every rank (all_gather needs it).

Two kinds of formatted data are read, told apart by the format manifest's
schema version: stage 1's M3T conversations and stage 2's MMEB-train samples
(``RECORD_KINDS``). A stage-2 batch has the same fields, with K = 2 (see Batch).
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.data import mmeb_train, mmeb_train_ingest, schema
from muco_flow.data.finetune_formatting import RECORD_COLUMNS as STAGE2_RECORD_COLUMNS
from muco_flow.data.finetune_formatting import assemble_finetune_sample
from muco_flow.data.formatting import FORMATTED_SCHEMA, Conversation, assemble_conversations
from muco_flow.data.ingest import MANIFEST_FILE
from muco_flow.modeling import tokens
from muco_flow.modeling.inputs import collate, image_inputs

logger = logging.getLogger(__name__)

RECORD_COLUMNS = [f.name for f in FORMATTED_SCHEMA]


class StaleConversationsError(ValueError):
    """The conversations were formatted from other ingest shards than those in place."""


def check_conversations_match_shards(conversations_dir: Path, shards_dir: Path) -> None:
    """Refuses conversations formatted from other shards (a data run stopped between ingest and format).

    A conversation points at its image by (shard file, row); with shards of
    another snapshot in place it would train on the wrong image.
    """
    formatted = json.loads((Path(conversations_dir) / MANIFEST_FILE).read_text()).get("ingest_manifest_shards")
    ingested = [s["sha256"] for s in json.loads((Path(shards_dir) / MANIFEST_FILE).read_text())["shards"]]
    if formatted != ingested:
        recorded = "no record of its shards" if formatted is None else f"{len(formatted)} shards"
        raise StaleConversationsError(
            f"the conversations in {conversations_dir} were formatted from other shards ({recorded}) than the "
            f"{len(ingested)} in {shards_dir} now: re-run `kedro run --pipelines=format` (or `--pipelines=data`)"
        )


class ImageStore:
    """Image bytes by (ingest shard, row), reading whole row groups through a small LRU cache."""

    def __init__(self, shards_dir: Path, cached_row_groups: int = 8) -> None:
        self.shards_dir = Path(shards_dir)
        self._files: dict[str, tuple[pq.ParquetFile, list[int]]] = {}
        self._cache: OrderedDict[tuple[str, int, str], list[Any]] = OrderedDict()
        self._capacity = cached_row_groups

    def _file(self, shard: str) -> tuple[pq.ParquetFile, list[int]]:
        if shard not in self._files:
            parquet = pq.ParquetFile(self.shards_dir / shard)
            starts, total = [], 0
            for i in range(parquet.num_row_groups):
                starts.append(total)
                total += parquet.metadata.row_group(i).num_rows
            self._files[shard] = (parquet, starts)
        return self._files[shard]

    def get(self, shard: str, row: int, column: str = "image_bytes") -> Any:
        """The row's value in ``column``: bytes, or a list of them for the hard negatives' column."""
        parquet, starts = self._file(shard)
        group = max(i for i, start in enumerate(starts) if start <= row)
        key = (shard, group, column)
        if key not in self._cache:
            self._cache[key] = parquet.read_row_group(group, columns=[column]).column(0).to_pylist()
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key][row - starts[group]]


@dataclass
class Batch:
    """One rank's share of a global batch: B conversations of K turns each.

    Each side is the model's inputs (input_ids, attention_mask,
    mm_token_type_ids, and pixel_values with image_grid_thw when a row has an
    image) plus ``emb_index`` ([n, 2]: row, position of each ``<|emb|>``, in
    row order), so the embedder returns one vector per ``<|emb|>`` in that order.

    Stage 1: the query side has B rows of K turns; the target side B*K rows
    (independent layout) or B rows of K. Stage 2 (MMEB-train): K = 2, the query
    and target sides have B rows each with two ``<|emb|>``, so their embeddings
    come as [main_0, auxiliary_0, main_1, auxiliary_1, ...] (the official
    ``qry_reps``/``qry_reps2`` are ``[0::2]``/``[1::2]``); ``negative`` has B
    rows, one hard negative each with one ``<|emb|>`` (None without hard negatives).
    """

    query: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    turns: int
    conversation_ids: list[str]
    target_keys: torch.Tensor  # [B*K], sample-major; equal for equal target texts
    negative: dict[str, torch.Tensor] | None = None
    negative_keys: torch.Tensor | None = None  # stage 1: [B*K], the negatives' texts as target_keys

    @property
    def pairs(self) -> int:
        return len(self.conversation_ids) * self.turns

    @property
    def tokens(self) -> int:
        sides = [self.query, self.target] + ([self.negative] if self.negative is not None else [])
        return int(sum(side["attention_mask"].sum() for side in sides))


# A side's images in a batch: one per row (None: none), and the tokens each was formatted with.
SideImages = tuple[Sequence[Image.Image | None], Sequence[int]]


class ConversationBatches:
    """Deterministic, rank-sharded batches over formatted records.

    The records stay one Arrow table (a few bytes per token, no Python object
    per conversation); a batch's records are decoded when the batch is made,
    and their conversations assembled for the batch's epoch.
    """

    def __init__(
        self,
        conversations_dir: Path,
        shards_dir: Path,
        image_processor: Qwen2VLImageProcessorPil,
        *,
        pad_id: int,
        image_pad_id: int,
        emb_id: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        hard_negatives: bool = False,
    ) -> None:
        manifest = json.loads((Path(conversations_dir) / MANIFEST_FILE).read_text())
        self.kind = RECORD_KINDS.get(manifest.get("schema_version"))
        # stage 1 reads the formatted hard negatives only when training asks for them
        self.settings = manifest["settings"]
        if self.kind is RECORD_KINDS.get(schema.SCHEMA_VERSION):
            if hard_negatives and not self.settings.get("hard_negatives"):
                raise ValueError(
                    f"training.hard_negatives is set but {conversations_dir} was formatted without them; "
                    "re-run the format pipeline with format.hard_negatives: true"
                )
            self.settings = {**self.settings, "hard_negatives": hard_negatives}
        tables = []
        for shard in manifest["shards"]:
            path = Path(conversations_dir) / shard["file"]
            missing = sorted(set(self.kind.columns) - set(pq.read_schema(path).names)) if self.kind else []
            if missing or self.kind is None:
                raise ValueError(
                    f"{path} was formatted by another muco-flow version (schema "
                    f"{manifest.get('schema_version')}, this one reads {', '.join(RECORD_KINDS)}"
                    + (f"; no column {', '.join(missing)}" if missing else "")
                    + "); re-run the format pipeline"
                )
            tables.append(pq.read_table(path, columns=self.kind.columns, memory_map=True))
        self.records = pa.concat_tables(tables) if tables else None
        if self.records is None or self.records.num_rows == 0:
            raise ValueError(f"no conversations in {conversations_dir}; run the format pipeline first")
        self.images = ImageStore(shards_dir)
        self.image_processor = image_processor
        self.pad_id, self.image_pad_id, self.emb_id = pad_id, image_pad_id, emb_id
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        # one unit per conversation: (record, part), grouped by its number of turns
        parts = self.kind.parts(self.records)
        self._by_turns: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for index, turns in enumerate(parts):
            for part, n in enumerate(turns):
                if n:
                    self._by_turns[n].append((index, part))
        self.conversations = sum(len(units) for units in self._by_turns.values())
        self._epoch_cache: tuple[int, list[list[tuple[int, int]]]] | None = None
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.conversations} conversations give no full batch of {batch_size} per rank x {world_size} "
                "ranks; lower training.micro_batch_size or use more data"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return sum(len(units) // self.global_batch for units in self._by_turns.values())

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's global batches ((record, part) units), same on every rank."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(f"muco-train:{self.seed}:{epoch}")
        batches, left_out = [], 0
        for turns in sorted(self._by_turns):
            units = list(self._by_turns[turns])
            rng.shuffle(units)
            full = len(units) // self.global_batch * self.global_batch
            left_out += len(units) - full
            batches.extend(units[i : i + self.global_batch] for i in range(0, full, self.global_batch))
        rng.shuffle(batches)
        if left_out and epoch == 0 and self.rank == 0:
            # different conversations are left out each epoch, since the shuffle differs
            logger.info("each epoch leaves out %d conversations that do not fill a batch", left_out)
        self._epoch_cache = (epoch, batches)
        return batches

    def batch(self, step: int) -> Batch:
        """This rank's part of global batch ``step`` (epochs continue one after another)."""
        (whole,) = self.batch_chunks(step, self.batch_size)
        return whole

    def batch_chunks(self, step: int, chunk_size: int) -> list[Batch]:
        """The conversations of ``batch(step)``, in order, as batches of at most ``chunk_size`` (GradCache)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        members = self.epoch_batches(epoch)[index]
        mine = members[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [self._collate(mine[i : i + chunk_size], epoch) for i in range(0, len(mine), chunk_size)]

    def _collate(self, mine: list[tuple[int, int]], epoch: int) -> Batch:
        records = self.records.take([record for record, _ in mine]).to_pylist()
        rows = [
            self.kind.row(record, part, epoch, self.settings, self.image_pad_id, self.images)
            for record, (_, part) in zip(records, mine, strict=True)
        ]
        conversations = [conversation for conversation, _ in rows]

        def side(name: str) -> SideImages | None:
            if name not in rows[0][1]:
                return None
            return [images[name][0] for _, images in rows], [images[name][1] for _, images in rows]

        query_images, query_tokens = side("query")
        return collate_conversations(
            conversations,
            query_images,
            query_tokens,
            self.image_processor,
            pad_id=self.pad_id,
            image_pad_id=self.image_pad_id,
            emb_id=self.emb_id,
            short_side=self.settings.get("image_short_side"),
            target_images=side("target"),
            negative_images=side("negative"),
        )


def _open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# One record in one epoch: its conversation, and each side's (image or None, formatted image tokens).
RowImages = dict[str, tuple[Image.Image | None, int]]


def _stage1_row(
    record: dict[str, Any], part: int, epoch: int, settings: dict[str, Any], image_pad_id: int, images: ImageStore
) -> tuple[Conversation, RowImages]:
    conversation = assemble_conversations(record, epoch, settings, image_pad_id)[part]
    shard = record["image_shard"]
    image = None if shard is None else _open_image(images.get(shard, record["image_row"]))
    return conversation, {"query": (image, record["image_tokens"])}


def _stage2_row(
    record: dict[str, Any], part: int, epoch: int, settings: dict[str, Any], image_pad_id: int, images: ImageStore
) -> tuple[Conversation, RowImages]:
    sample = assemble_finetune_sample(record, epoch, settings, image_pad_id)
    shard, row = record["image_shard"], record["image_row"]

    def image(tokens_: int, column: str, index: int | None = None) -> tuple[Image.Image | None, int]:
        if not tokens_:
            return None, 0
        value = images.get(shard, row, column)
        return _open_image(value if index is None else value[index]), tokens_

    row_images = {
        "query": image(record["query_image_tokens"], "image_bytes"),
        "target": image(record["target_image_tokens"], f"{mmeb_train_ingest.TARGET_IMAGE_PREFIX}image_bytes"),
    }
    if sample.negative is not None:
        row_images["negative"] = image(
            record["negative_image_tokens"][sample.negative],
            f"{mmeb_train_ingest.NEGATIVE_IMAGE_PREFIX}image_bytes",
            record["negative_source"][sample.negative],
        )
    return sample.conversation, row_images


@dataclass(frozen=True)
class RecordKind:
    """One kind of formatted data: its record columns, its conversations per record, and how one is made."""

    columns: list[str]
    parts: Callable[[pa.Table], list[list[int]]]  # per record: turns of each of its conversations (0: left out)
    row: Callable[[dict[str, Any], int, int, dict[str, Any], int, ImageStore], tuple[Conversation, RowImages]]


RECORD_KINDS = {
    schema.SCHEMA_VERSION: RecordKind(
        RECORD_COLUMNS, lambda records: records.column("part_turns").to_pylist(), _stage1_row
    ),
    # one conversation per sample, with the main and the auxiliary <|emb|>
    mmeb_train.SCHEMA_VERSION: RecordKind(STAGE2_RECORD_COLUMNS, lambda records: [[2]] * records.num_rows, _stage2_row),
}


def _with_images(
    side: dict[str, torch.Tensor],
    images: SideImages,
    conversation_ids: list[str],
    name: str,
    image_processor: Qwen2VLImageProcessorPil,
    short_side: int | None,
) -> dict[str, torch.Tensor]:
    """``side`` with the pixel inputs of its rows' images; each image must give the tokens it was formatted with."""
    present = [(cid, image, n) for cid, image, n in zip(conversation_ids, images[0], images[1], strict=True) if image]
    if not present:
        return side
    pixel_values, grid, counts = image_inputs(image_processor, [image for _, image, _ in present], short_side)
    for (conversation_id, _, expected), count in zip(present, counts, strict=True):
        if count != expected:
            raise ValueError(
                f"conversation {conversation_id}: the {name} image gives {count} tokens but it was "
                f"formatted with {expected}; re-run the format pipeline with this backbone's image processor"
            )
    return side | {"pixel_values": pixel_values, "image_grid_thw": grid}


def collate_conversations(
    conversations: list[Conversation],
    images: Sequence[Image.Image | None],
    image_tokens: Sequence[int],
    image_processor: Qwen2VLImageProcessorPil,
    *,
    pad_id: int,
    image_pad_id: int,
    emb_id: int,
    short_side: int | None = None,
    target_images: SideImages | None = None,
    negative_images: SideImages | None = None,
) -> Batch:
    """A batch from conversations (all with the same K) and each one's image (None: none).

    Embeddings are read at every ``<|emb|>`` in row order, which is
    sample-major: query row b holds turns b*K..b*K+K-1; the target side has
    one row per turn (B*K rows) or one per conversation. ``target_images``
    gives each target row's image (stage 2); the conversations' hard
    negatives, when they have them, become the ``negative`` side, with
    ``negative_images``.
    """
    ids_ = [c.conversation_id for c in conversations]
    query = collate([c.query_ids for c in conversations], pad_id, image_pad_id)
    query = _with_images(query, (images, image_tokens), ids_, "query", image_processor, short_side)
    query["emb_index"] = (query["input_ids"] == emb_id).nonzero()
    target = collate([row for c in conversations for row in c.target_ids], pad_id, image_pad_id)
    if target_images is not None:
        target = _with_images(target, target_images, ids_, "target", image_processor, short_side)
    target["emb_index"] = (target["input_ids"] == emb_id).nonzero()
    turns = len(conversations[0].turn_type)
    counts = {"query": (query, len(conversations) * turns), "target": (target, len(conversations) * turns)}
    negative = negative_keys = None
    if conversations[0].negative_ids is not None:
        if any(c.negative_ids is None for c in conversations):
            raise ValueError("some conversations of the batch have a hard negative and some have none")
        # one row per hard negative: one per turn (stage 1) or per sample (stage 2, with its image)
        rows = [row for c in conversations for row in c.negative_ids]
        negative = collate(rows, pad_id, image_pad_id)
        if negative_images is not None:
            negative = _with_images(negative, negative_images, ids_, "hard negative", image_processor, short_side)
        negative["emb_index"] = (negative["input_ids"] == emb_id).nonzero()
        counts["hard negative"] = (negative, len(rows))
        if conversations[0].negative_key is not None:
            negative_keys = torch.tensor([key for c in conversations for key in c.negative_key], dtype=torch.long)
    for side, (batch, expected) in counts.items():
        if batch["emb_index"].shape[0] != expected:
            raise ValueError(
                f"the {side} side holds {batch['emb_index'].shape[0]} {tokens.EMB_TOKEN} for "
                f"{len(conversations)} conversations of {turns} turns"
            )
    keys = torch.tensor([key for c in conversations for key in c.target_key], dtype=torch.long)
    return Batch(query, target, turns, ids_, keys, negative, negative_keys)
