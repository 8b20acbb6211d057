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
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.data.ingest import MANIFEST_FILE
from muco_flow.modeling.inputs import collate, image_inputs

logger = logging.getLogger(__name__)

RECORD_COLUMNS = [
    "conversation_id",
    "image_shard",
    "image_row",
    "image_tokens",
    "turn_type",
    "query_input_ids",
    "query_emb_positions",
    "target_input_ids",
    "target_emb_positions",
    "target_key",
    "target_turn_lengths",
]
# read with training.hard_negatives (formatted with format.hard_negatives)
NEGATIVE_COLUMNS = ["negative_input_ids", "negative_emb_positions", "negative_key", "negative_turn_lengths"]


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
    negative: dict[str, torch.Tensor] | None = None  # hard negatives, one one-turn conversation per turn
    negative_keys: torch.Tensor | None = None  # [B*K], the target_keys of the negatives' texts

    @property
    def pairs(self) -> int:
        return len(self.conversation_ids) * self.turns

    @property
    def tokens(self) -> int:
        sides = [self.query, self.target] + ([self.negative] if self.negative is not None else [])
        return int(sum(side["attention_mask"].sum() for side in sides))


class ConversationBatches:
    """Deterministic, rank-sharded batches over formatted conversation shards."""

    def __init__(
        self,
        conversations_dir: Path,
        shards_dir: Path,
        image_processor: Qwen2VLImageProcessorPil,
        *,
        pad_id: int,
        image_pad_id: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        hard_negatives: bool = False,
    ) -> None:
        manifest = json.loads((Path(conversations_dir) / MANIFEST_FILE).read_text())
        self.independent_targets = manifest["settings"].get("target_layout") == "independent"
        self.hard_negatives = hard_negatives
        if hard_negatives and not manifest["settings"].get("hard_negatives"):
            raise ValueError(
                f"training.hard_negatives is set but {conversations_dir} was formatted without them; "
                "re-run the format pipeline with format.hard_negatives: true"
            )
        columns = RECORD_COLUMNS + (NEGATIVE_COLUMNS if hard_negatives else [])
        self.records: list[dict[str, Any]] = []
        for shard in manifest["shards"]:
            path = Path(conversations_dir) / shard["file"]
            missing = sorted(set(columns) - set(pq.read_schema(path).names))
            if missing:
                raise ValueError(
                    f"{path} has no column {', '.join(missing)}: it was formatted by an older muco-flow; "
                    "re-run the format pipeline"
                )
            self.records.extend(pq.read_table(path, columns=columns).to_pylist())
        if not self.records:
            raise ValueError(f"no conversations in {conversations_dir}; run the format pipeline first")
        self.images = ImageStore(shards_dir)
        self.image_processor = image_processor
        self.pad_id, self.image_pad_id = pad_id, image_pad_id
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self._by_turns: dict[int, list[int]] = defaultdict(list)
        for index, record in enumerate(self.records):
            self._by_turns[len(record["turn_type"])].append(index)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.records)} conversations give no full batch of {batch_size} per rank x {world_size} "
                "ranks; lower training.micro_batch_size or use more data"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return sum(len(ids) // self.global_batch for ids in self._by_turns.values())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (record indices), same on every rank."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(f"muco-train:{self.seed}:{epoch}")
        batches, left_out = [], 0
        for turns in sorted(self._by_turns):
            ids = list(self._by_turns[turns])
            rng.shuffle(ids)
            full = len(ids) // self.global_batch * self.global_batch
            left_out += len(ids) - full
            batches.extend(ids[i : i + self.global_batch] for i in range(0, full, self.global_batch))
        rng.shuffle(batches)
        if left_out and epoch == 0 and self.rank == 0:
            # different conversations are left out each epoch, since the shuffle differs
            logger.info("each epoch leaves out %d conversations that do not fill a batch", left_out)
        self._epoch_cache = (epoch, batches)
        return batches

    def batch(self, step: int) -> Batch:
        """This rank's part of global batch ``step`` (epochs continue one after another)."""
        return self._collate(self._members(step))

    def batch_chunks(self, step: int, chunk_size: int) -> list[Batch]:
        """The same conversations as ``batch(step)``, in order, as batches of at most ``chunk_size`` (GradCache)."""
        mine = self._members(step)
        return [self._collate(mine[i : i + chunk_size]) for i in range(0, len(mine), chunk_size)]

    def _members(self, step: int) -> list[dict[str, Any]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        members = self.epoch_batches(epoch)[index]
        return [self.records[i] for i in members[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]]

    def _collate(self, records: list[dict[str, Any]]) -> Batch:
        images = [
            Image.open(io.BytesIO(self.images.get(r["image_shard"], r["image_row"]))).convert("RGB") for r in records
        ]
        return collate_conversations(
            records,
            images,
            self.image_processor,
            pad_id=self.pad_id,
            image_pad_id=self.image_pad_id,
            independent_targets=self.independent_targets,
            hard_negatives=self.hard_negatives,
        )


def collate_conversations(
    records: list[dict[str, Any]],
    images: list[Image.Image],
    image_processor: Qwen2VLImageProcessorPil,
    *,
    pad_id: int,
    image_pad_id: int,
    independent_targets: bool,
    hard_negatives: bool = False,
) -> Batch:
    """A batch from formatted conversation records (all with the same K) and each one's image.

    With ``independent_targets`` (format.target_layout "independent") the
    target side has one row per turn, B*K rows in sample-major order; so has
    the hard negative side, with ``hard_negatives``.
    """
    pixel_values, grid, counts = image_inputs(image_processor, images)
    for record, count in zip(records, counts, strict=True):
        if count != record["image_tokens"]:
            raise ValueError(
                f"conversation {record['conversation_id']}: the image gives {count} tokens but it was formatted "
                f"with {record['image_tokens']}; re-run the format pipeline with this backbone's image processor"
            )
    query = collate([r["query_input_ids"] for r in records], pad_id, image_pad_id)
    query |= {"pixel_values": pixel_values, "image_grid_thw": grid}
    query["emb_index"] = _emb_index(records, "query_emb_positions")
    if independent_targets:
        target = _one_turn_conversations(records, "target", pad_id, image_pad_id)
    else:
        target = collate([r["target_input_ids"] for r in records], pad_id, image_pad_id)
        target["emb_index"] = _emb_index(records, "target_emb_positions")
    keys = torch.tensor([key for r in records for key in r["target_key"]], dtype=torch.long)
    batch = Batch(query, target, len(records[0]["turn_type"]), [r["conversation_id"] for r in records], keys)
    if hard_negatives:
        batch.negative = _one_turn_conversations(records, "negative", pad_id, image_pad_id)
        batch.negative_keys = torch.tensor([key for r in records for key in r["negative_key"]], dtype=torch.long)
    return batch


def _one_turn_conversations(
    records: list[dict[str, Any]], side: str, pad_id: int, image_pad_id: int
) -> dict[str, torch.Tensor]:
    """The ``side`` ("target" or "negative") as one row per turn, sample-major, each row its own conversation."""
    turns = [turn for r in records for turn in _split_turns(r, side)]
    inputs = collate([ids for ids, _ in turns], pad_id, image_pad_id)
    inputs["emb_index"] = torch.tensor([(row, emb) for row, (_, emb) in enumerate(turns)], dtype=torch.long)
    return inputs


def _emb_index(records: list[dict[str, Any]], column: str) -> torch.Tensor:
    """[B*K, 2] (row, position), sample-major: row b*K + k is conversation b, turn k."""
    return torch.tensor([(row, pos) for row, r in enumerate(records) for pos in r[column]], dtype=torch.long)


def _split_turns(record: dict[str, Any], side: str = "target") -> list[tuple[list[int], int]]:
    """Each ``side`` turn's tokens and its ``<|emb|>`` position within them."""
    turns, start = [], 0
    for length, emb in zip(record[f"{side}_turn_lengths"], record[f"{side}_emb_positions"], strict=True):
        turns.append((record[f"{side}_input_ids"][start : start + length], emb - start))
        start += length
    return turns
