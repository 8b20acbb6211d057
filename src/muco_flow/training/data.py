"""Training batches from formatted conversations.

A global step maps to one batch through a seeded per-epoch shuffle, so the
data position of a resumed run is just its step. Each batch holds
conversations with the same number of turns K (the loss's B*K layout needs
it) and the same number B on every rank (all_gather needs it).
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.data import schema
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
        self._cache: OrderedDict[tuple[str, int], list[bytes]] = OrderedDict()
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

    def get(self, shard: str, row: int) -> bytes:
        parquet, starts = self._file(shard)
        group = max(i for i, start in enumerate(starts) if start <= row)
        key = (shard, group)
        if key not in self._cache:
            self._cache[key] = parquet.read_row_group(group, columns=["image_bytes"]).column(0).to_pylist()
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key][row - starts[group]]


@dataclass
class Batch:
    """One rank's share of a global batch: B conversations of K turns each."""

    query: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    turns: int
    conversation_ids: list[str]
    target_keys: torch.Tensor  # [B*K], sample-major; equal for equal target texts

    @property
    def pairs(self) -> int:
        return len(self.conversation_ids) * self.turns

    @property
    def tokens(self) -> int:
        return int(self.query["attention_mask"].sum() + self.target["attention_mask"].sum())


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
    ) -> None:
        manifest = json.loads((Path(conversations_dir) / MANIFEST_FILE).read_text())
        self.settings = manifest["settings"]
        tables = []
        for shard in manifest["shards"]:
            path = Path(conversations_dir) / shard["file"]
            missing = sorted(set(RECORD_COLUMNS) - set(pq.read_schema(path).names))
            if missing or manifest.get("schema_version") != schema.SCHEMA_VERSION:
                raise ValueError(
                    f"{path} was formatted by another muco-flow version (schema "
                    f"{manifest.get('schema_version')}, this one reads {schema.SCHEMA_VERSION}"
                    + (f"; no column {', '.join(missing)}" if missing else "")
                    + "); re-run the format pipeline"
                )
            tables.append(pq.read_table(path, columns=RECORD_COLUMNS, memory_map=True))
        self.records = pa.concat_tables(tables) if tables else None
        if self.records is None or self.records.num_rows == 0:
            raise ValueError(f"no conversations in {conversations_dir}; run the format pipeline first")
        self.images = ImageStore(shards_dir)
        self.image_processor = image_processor
        self.pad_id, self.image_pad_id, self.emb_id = pad_id, image_pad_id, emb_id
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        # one unit per conversation: (record, part), grouped by its number of turns
        parts = self.records.column("part_turns").to_pylist()
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
        epoch, index = divmod(step, self.steps_per_epoch)
        members = self.epoch_batches(epoch)[index]
        mine = members[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        records = self.records.take([record for record, _ in mine]).to_pylist()
        conversations = [
            assemble_conversations(record, epoch, self.settings, self.image_pad_id)[part]
            for record, (_, part) in zip(records, mine, strict=True)
        ]
        images = [
            None
            if record["image_shard"] is None
            else Image.open(io.BytesIO(self.images.get(record["image_shard"], record["image_row"]))).convert("RGB")
            for record in records
        ]
        return collate_conversations(
            conversations,
            images,
            [record["image_tokens"] for record in records],
            self.image_processor,
            pad_id=self.pad_id,
            image_pad_id=self.image_pad_id,
            emb_id=self.emb_id,
            short_side=self.settings.get("image_short_side"),
        )


def collate_conversations(
    conversations: list[Conversation],
    images: list[Image.Image | None],
    image_tokens: list[int],
    image_processor: Qwen2VLImageProcessorPil,
    *,
    pad_id: int,
    image_pad_id: int,
    emb_id: int,
    short_side: int | None = None,
) -> Batch:
    """A batch from conversations (all with the same K) and each one's image (None: none).

    Embeddings are read at every ``<|emb|>`` in row order, which is
    sample-major: query row b holds turns b*K..b*K+K-1; the target side has
    one row per turn (B*K rows) or one per conversation.
    """
    query = collate([c.query_ids for c in conversations], pad_id, image_pad_id)
    present = [(c, image, n) for c, image, n in zip(conversations, images, image_tokens, strict=True) if image]
    if present:
        pixel_values, grid, counts = image_inputs(image_processor, [image for _, image, _ in present], short_side)
        for (conversation, _, expected), count in zip(present, counts, strict=True):
            if count != expected:
                raise ValueError(
                    f"conversation {conversation.conversation_id}: the image gives {count} tokens but it was "
                    f"formatted with {expected}; re-run the format pipeline with this backbone's image processor"
                )
        query |= {"pixel_values": pixel_values, "image_grid_thw": grid}
    query["emb_index"] = (query["input_ids"] == emb_id).nonzero()
    target = collate([row for c in conversations for row in c.target_ids], pad_id, image_pad_id)
    target["emb_index"] = (target["input_ids"] == emb_id).nonzero()
    turns = len(conversations[0].turn_type)
    for side, batch in (("query", query), ("target", target)):
        if batch["emb_index"].shape[0] != len(conversations) * turns:
            raise ValueError(
                f"the {side} side holds {batch['emb_index'].shape[0]} {tokens.EMB_TOKEN} for "
                f"{len(conversations)} conversations of {turns} turns"
            )
    keys = torch.tensor([key for c in conversations for key in c.target_key], dtype=torch.long)
    return Batch(query, target, turns, [c.conversation_id for c in conversations], keys)
