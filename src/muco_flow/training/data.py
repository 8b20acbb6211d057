"""Training batches from formatted conversations, streamed from memory-mapped files.

A global step maps to one batch through a seeded per-epoch shuffle, so the
data position of a resumed run is just its step. Each batch holds
conversations with the same number of turns K (the loss's B*K layout needs
it) and the same number B on every rank (all_gather needs it).

Memory per rank does not grow with the data: the records stay in their
memory-mapped Arrow IPC files (the page cache holds them, shared by a node's
ranks), and the index and each epoch's order are a few numpy integers per
conversation. A rank decodes only its own share of a batch's records, and
reads a stage-1 image with one positioned read of exactly its bytes.
``batch_loader`` runs this, the image processor and collation in DataLoader
worker processes, a few steps ahead of the model.

Two kinds of formatted data are read, told apart by the format manifest's
schema version: stage 1's M3T conversations and stage 2's MMEB-train samples
(``RECORD_KINDS``). A stage-2 batch has the same fields, with K = 2 (see Batch).
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import random
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.data import mmeb_train, mmeb_train_ingest, schema
from muco_flow.data.formatting import FORMATTED_SCHEMA, Conversation, assemble_conversations
from muco_flow.data.ingest import MANIFEST_FILE
from muco_flow.data.mmeb_train_formatting import RECORD_COLUMNS as STAGE2_RECORD_COLUMNS
from muco_flow.data.mmeb_train_formatting import assemble_finetune_sample
from muco_flow.data.record_index import INDEX_FILE, RecordIndex, scan_record_files
from muco_flow.modeling import tokens
from muco_flow.modeling.inputs import collate, image_inputs
from muco_flow.training.config import DataMixSettings
from muco_flow.training.heldout import heldout_records
from muco_flow.training.preemption import ignore_stop_signals

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


# record files kept open (memory-mapped) per process; M3T has about a thousand
OPEN_RECORD_FILES = 64


class ImageStore:
    """Image bytes by (ingest shard, row), reading whole row groups through a small LRU cache.

    Stage 2 reads its images here; stage 1's are in the record files' image files.
    """

    def __init__(self, shards_dir: Path, cached_row_groups: int = 8) -> None:
        self.shards_dir = Path(shards_dir)
        self._files: dict[str, tuple[pq.ParquetFile, list[int]]] = {}
        self._cache: OrderedDict[tuple[str, int, str], list[Any]] = OrderedDict()
        self._capacity = cached_row_groups

    def __getstate__(self) -> dict[str, Any]:
        # a DataLoader worker opens its own files
        return {**self.__dict__, "_files": {}, "_cache": OrderedDict()}

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


class FormattedRecords:
    """The format manifest's records by global index (manifest order), memory-mapped.

    Files are opened lazily in the process that reads them, so the object can
    be handed to DataLoader workers without open handles.
    """

    def __init__(
        self,
        conversations_dir: Path,
        manifest: dict[str, Any],
        columns: list[str],
        list_columns: tuple[str, ...] = (),
        category_columns: tuple[str, ...] = (),
    ) -> None:
        """``list_columns`` and ``category_columns``: the columns of every record start-up needs (RecordKind)."""
        self.directory = Path(conversations_dir)
        self.files: list[tuple[Path, Path | None]] = []  # record file, its image file (stage 1)
        for shard in manifest["shards"]:
            path = self.directory / shard["file"]
            if path.suffix != ".arrow":
                raise ValueError(
                    f"{path} was formatted by an earlier muco-flow version (Parquet records; this one memory-maps "
                    "Arrow IPC files); re-run the format pipeline"
                )
            schema_names = pa.ipc.open_file(pa.memory_map(str(path))).schema.names  # the footer only
            missing = sorted(set(columns) - set(schema_names))
            if missing:
                raise ValueError(
                    f"{path} was formatted by another muco-flow version (no column {', '.join(missing)}); "
                    "re-run the format pipeline"
                )
            self.files.append((path, self.directory / shard["images"] if "images" in shard else None))
        self.index = self._read_index(manifest, list_columns, category_columns)
        # each file's first record batch (global numbering): a record per batch makes millions of batches, so a
        # batch's file and place in it are looked up here rather than kept per batch
        self._file_first_batch = np.concatenate([[0], np.cumsum(self.index.batches_per_file, dtype=np.int64)])
        self._batch_starts = np.concatenate([[0], np.cumsum(self.index.batch_rows, dtype=np.int64)])
        self.rows = self.index.rows
        self._open: OrderedDict[int, pa.ipc.RecordBatchFileReader] = OrderedDict()

    def _read_index(
        self, manifest: dict[str, Any], list_columns: tuple[str, ...], category_columns: tuple[str, ...]
    ) -> RecordIndex:
        """The format pipeline's record index; data formatted without one is scanned (every record file, once)."""
        if manifest.get("record_index"):
            index = RecordIndex.load(self.directory)
            if set(list_columns) <= set(index.lists) and set(category_columns) <= set(index.categories):
                if len(index.batches_per_file) != len(self.files):
                    raise ValueError(
                        f"{self.directory / INDEX_FILE} indexes {len(index.batches_per_file)} record files, the "
                        f"manifest lists {len(self.files)}; re-run the format pipeline"
                    )
                return index
        logger.info("%s has no record index of these columns: scanning its record files", self.directory)
        return scan_record_files([path for path, _ in self.files], list_columns, category_columns)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}

    def _reader(self, file: int) -> pa.ipc.RecordBatchFileReader:
        if file not in self._open:
            with open(self.files[file][0], "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            # no read-around: the records next to this one are other ranks' (the kernel would read 128 KiB
            # around each page a record touches)
            mapped.madvise(mmap.MADV_RANDOM)
            self._open[file] = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped)))
            if len(self._open) > OPEN_RECORD_FILES:
                self._open.popitem(last=False)
        self._open.move_to_end(file)
        return self._open[file]

    def list_column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A list<int> column of every record as flat values and each record's length (no object per record)."""
        return self.index.lists[name]

    def category_column(self, name: str) -> tuple[np.ndarray, list[str]]:
        """A string column of every record as codes into its sorted distinct values, and those values."""
        return self.index.categories[name]

    def record(self, index: int) -> dict[str, Any]:
        """Record ``index`` as a dict; a stage-1 record's image bytes under "image" (None: no image)."""
        at = int(np.searchsorted(self._batch_starts, index, side="right")) - 1
        file = int(np.searchsorted(self._file_first_batch, at, side="right")) - 1
        batch = at - int(self._file_first_batch[file])
        (record,) = self._reader(file).get_batch(batch).slice(index - int(self._batch_starts[at]), 1).to_pylist()
        if record.get("image_offset") is not None:
            record["image"] = self._image(file, record)
        elif "image_offset" in record:
            record["image"] = None
        return record

    def _image(self, file: int, record: dict[str, Any]) -> bytes:
        records, path = self.files[file]
        if path is None:  # a manifest edited by hand, or of another version
            raise ValueError(
                f"{records} places images in an image file that its manifest does not name; re-run the format pipeline"
            )
        fd = os.open(path, os.O_RDONLY)
        try:
            # no read-ahead: the next image this process needs is elsewhere
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            data = os.pread(fd, record["image_length"], record["image_offset"])
        finally:
            os.close(fd)
        if len(data) != record["image_length"]:
            raise ValueError(
                f"{path} ends before the image of sample {record[schema.SAMPLE_ID]} (offset "
                f"{record['image_offset']}, {record['image_length']} bytes); re-run the format pipeline"
            )
        return data


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
    # [B*K], sample-major: each turn's M3T turn type (data/schema.py), -1 where unknown (stage 2)
    turn_types: torch.Tensor | None = None

    @property
    def pairs(self) -> int:
        return len(self.conversation_ids) * self.turns

    @property
    def tokens(self) -> int:
        sides = [self.query, self.target] + ([self.negative] if self.negative is not None else [])
        return int(sum(side["attention_mask"].sum() for side in sides))


@dataclass(frozen=True)
class HeldoutUnits:
    """The held-out slice's conversations, as flat arrays: each one's record, part of the record and turns."""

    record: np.ndarray
    part: np.ndarray
    turns: np.ndarray


# A side's images in a batch: one per row (None: none), and the tokens each was formatted with.
SideImages = tuple[Sequence[Image.Image | None], Sequence[int]]


class ConversationBatches:
    """Deterministic, rank-sharded batches over formatted records.

    The records stay in their memory-mapped files; a batch's records are
    decoded when the batch is made, and their conversations assembled for the
    batch's epoch. Objects of this class can be handed to DataLoader workers.
    """

    def __init__(
        self,
        conversations_dir: Path,
        shards_dir: Path,
        image_processor: Qwen2VLImageProcessorPil | None,
        *,
        pad_id: int,
        image_pad_id: int,
        emb_id: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        hard_negatives: bool = False,
        data_mix: DataMixSettings | None = None,
        heldout: int = 0,
    ) -> None:
        manifest = json.loads((Path(conversations_dir) / MANIFEST_FILE).read_text())
        kind = RECORD_KINDS.get(manifest.get("schema_version"))
        if kind is None:
            raise ValueError(
                f"{conversations_dir} was formatted by another muco-flow version (schema "
                f"{manifest.get('schema_version')}, this one reads {', '.join(RECORD_KINDS)}); "
                "re-run the format pipeline"
            )
        self.kind: RecordKind = kind
        # stage 1 reads the formatted hard negatives only when training asks for them
        self.settings = manifest["settings"]
        if self.kind is RECORD_KINDS.get(schema.SCHEMA_VERSION):
            if hard_negatives and not self.settings.get("hard_negatives"):
                raise ValueError(
                    f"training.hard_negatives is set but {conversations_dir} was formatted without them; "
                    "re-run the format pipeline with format.hard_negatives: true"
                )
            self.settings = {**self.settings, "hard_negatives": hard_negatives}
        self.records = FormattedRecords(
            conversations_dir, manifest, self.kind.columns, self.kind.list_columns, self.kind.category_columns
        )
        if self.records.rows == 0:
            raise ValueError(f"no conversations in {conversations_dir}; run the format pipeline first")
        self.images = ImageStore(shards_dir)
        self.image_processor = image_processor
        self.pad_id, self.image_pad_id, self.emb_id = pad_id, image_pad_id, emb_id
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        # one unit per conversation, as flat arrays: its record, its part of the record, its turns
        unit_record, unit_part, unit_turns = self.kind.units(self.records)
        # the held-out slice (training/heldout.py): whole records, never trained on; the rest is the training data
        held = np.isin(unit_record, heldout_records(self.records.rows, heldout))
        self.heldout = HeldoutUnits(unit_record[held], unit_part[held], unit_turns[held])
        self.unit_record, self.unit_part, self.unit_turns = unit_record[~held], unit_part[~held], unit_turns[~held]
        if heldout and rank == 0:
            logger.info(
                "held out of training (training.during_training): %d of %d records, %d conversations",
                heldout, self.records.rows, len(self.heldout.turns),
            )  # fmt: skip
        self.conversations = len(self.unit_turns)
        # each unit's dataset, as an index into dataset_names (M3T: one dataset, "")
        if "dataset" in self.kind.columns:
            codes, self.dataset_names = self.records.category_column("dataset")
            self.unit_dataset = codes[self.unit_record]
        else:
            self.unit_dataset, self.dataset_names = np.zeros(self.conversations, np.int64), [""]
        self.data_mix = data_mix or DataMixSettings(weights={}, caps={}, homogeneous_batches=False)
        self.epoch_counts = epoch_counts(
            np.bincount(self.unit_dataset, minlength=len(self.dataset_names)), self.dataset_names, self.data_mix
        )
        if len(set(self.unit_turns.tolist())) > 1 and (self.data_mix.weights or self.data_mix.caps):
            # a draw per dataset would leave each turn count's batches to chance, and so the steps per epoch
            raise ValueError("training.data_mix weights and caps need conversations of one turn count (stage 2)")
        # epoch -> its batches: the latest drawn, and those prepare_epochs drew for the DataLoader's workers
        self._epochs: dict[int, np.ndarray] = {}
        self._prepared: set[int] = set()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.conversations} conversations give no full batch of {batch_size} per rank x {world_size} "
                "ranks; lower training.micro_batch_size or use more data"
            )

    @classmethod
    def for_tokenizer(
        cls,
        conversations_dir: Path,
        shards_dir: Path,
        image_processor: Qwen2VLImageProcessorPil,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        hard_negatives: bool = False,
        data_mix: DataMixSettings | None = None,
        heldout: int = 0,
    ) -> ConversationBatches:
        """Batches collated with ``tokenizer``'s padding, ``<|image_pad|>`` and ``<|emb|>`` ids.

        ``tokenizer`` is the one the conversations were formatted with, MuCo's tokens added.
        """
        return cls(
            conversations_dir,
            shards_dir,
            image_processor,
            pad_id=tokens.token_id(tokenizer, tokenizer.pad_token),
            image_pad_id=tokens.token_id(tokenizer, tokens.IMAGE_PAD),
            emb_id=tokens.token_id(tokenizer, tokens.EMB_TOKEN),
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            hard_negatives=hard_negatives,
            data_mix=data_mix,
            heldout=heldout,
        )

    @classmethod
    def for_counting(
        cls,
        conversations_dir: Path,
        shards_dir: Path,
        *,
        batch_size: int,
        world_size: int,
        hard_negatives: bool,
        heldout: int = 0,
    ) -> ConversationBatches:
        """Batches that count steps and collate nothing (no tokenizer or image processor): what the launcher plans."""
        return cls(
            conversations_dir,
            shards_dir,
            None,
            pad_id=0,
            image_pad_id=0,
            emb_id=0,
            batch_size=batch_size,
            rank=0,
            world_size=world_size,
            seed=0,  # the order of the batches, not their number
            hard_negatives=hard_negatives,
            heldout=heldout,
        )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def _batch_groups(self) -> np.ndarray:
        """Each unit's batch group: conversations of one turn count (and, homogeneous, one dataset) share a batch."""
        if self.data_mix.homogeneous_batches:
            return self.unit_turns * len(self.dataset_names) + self.unit_dataset
        return self.unit_turns

    @property
    def steps_per_epoch(self) -> int:
        if not (self.data_mix.weights or self.data_mix.caps):
            sizes = np.bincount(self._batch_groups)  # every unit once
        elif self.data_mix.homogeneous_batches:
            # weights and caps need one turn count, so a group's size each epoch is known without drawing
            sizes = self.epoch_counts
        else:
            sizes = np.array([self.epoch_counts.sum()])
        return int(sum(int(n) // self.global_batch for n in sizes))

    def prepare_epochs(self, start: int, stop: int) -> None:
        """Draws the epochs of steps ``start`` .. ``stop - 1`` here, before DataLoader workers copy this object.

        Each worker would otherwise draw every epoch again itself (seconds per
        epoch at M3T's millions of conversations, at each epoch's first step).
        """
        steps = self.steps_per_epoch
        for epoch in range(start // steps, (max(stop, start + 1) - 1) // steps + 1):
            self.epoch_batches(epoch)
            self._prepared.add(epoch)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """The epoch's global batches as [steps, global batch] unit indices, the same on every rank."""
        if epoch in self._epochs:
            return self._epochs[epoch]
        # random.Random's shuffle on numpy arrays draws what it drew on the lists of earlier
        # versions, so a run's batches (and its results) stay what they were (without a data mix,
        # epoch_units draws nothing)
        rng = random.Random(f"muco-train:{self.seed}:{epoch}")
        units = epoch_units(self.unit_dataset, self.epoch_counts, rng)
        group_of = self._batch_groups[units]
        groups, left_out = [], 0
        for group in np.unique(group_of):
            members = units[group_of == group]
            rng.shuffle(members)  # type: ignore[arg-type]  # an ndarray shuffles in place like a list
            full = len(members) // self.global_batch * self.global_batch
            left_out += len(members) - full
            groups.append(members[:full].reshape(-1, self.global_batch))
        order = np.arange(self.steps_per_epoch)
        rng.shuffle(order)  # type: ignore[arg-type]  # as above
        batches = np.concatenate(groups)[order]
        if left_out and epoch == 0 and self.rank == 0:
            # different conversations are left out each epoch, since the shuffle differs
            logger.info("each epoch leaves out %d conversations that do not fill a batch", left_out)
        # keep the prepared epochs and this one: a rank reading on its own keeps one epoch at a time
        self._epochs = {e: b for e, b in self._epochs.items() if e in self._prepared} | {epoch: batches}
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

    def heldout_batches(self, batch_size: int) -> Iterator[Batch]:
        """The whole held-out slice, as batches of at most ``batch_size`` conversations of one turn count each.

        Assembled as in epoch 0 (each turn's first phrasing choice of that
        epoch), so every evaluation scores the same conversations; collated one
        batch at a time, so a large slice's images are never all in memory.
        """
        held = self.heldout
        for turns in np.unique(held.turns):
            units = np.flatnonzero(held.turns == turns)
            for start in range(0, len(units), batch_size):
                chosen = units[start : start + batch_size]
                yield self._collate_records(held.record[chosen], held.part[chosen], epoch=0)

    def _collate(self, units: np.ndarray, epoch: int) -> Batch:
        return self._collate_records(self.unit_record[units], self.unit_part[units], epoch)

    def _collate_records(self, records: np.ndarray, parts: np.ndarray, epoch: int) -> Batch:
        """A batch of the conversations (record, part of the record) in epoch ``epoch``."""
        if self.image_processor is None:
            raise TypeError("these batches were made for counting steps (for_counting) and collate nothing")
        rows = [
            self.kind.row(
                self.records.record(int(record)), int(part), epoch, self.settings, self.image_pad_id, self.images
            )
            for record, part in zip(records.tolist(), parts.tolist(), strict=True)
        ]
        conversations = [conversation for conversation, _ in rows]

        def side(name: str) -> SideImages:
            return [images[name][0] for _, images in rows], [images[name][1] for _, images in rows]

        def optional_side(name: str) -> SideImages | None:
            return side(name) if name in rows[0][1] else None

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
            target_images=optional_side("target"),
            negative_images=optional_side("negative"),
        )


def epoch_counts(samples: np.ndarray, names: Sequence[str], mix: DataMixSettings) -> np.ndarray:
    """How many samples of each dataset an epoch holds: round(weight x samples), at most its cap.

    ``samples``: each dataset's samples, in ``names``' order. A weight or cap
    naming no dataset of the data is an error (a typo would silently do nothing).
    """
    unknown = sorted((set(mix.weights) | set(mix.caps)) - set(names))
    if unknown:
        raise ValueError(
            f"training.data_mix names {', '.join(unknown)}, which the data does not hold "
            f"(its datasets: {', '.join(names)})"
        )
    counts = []
    for name, n in zip(names, samples.tolist(), strict=True):
        count = int(mix.weights.get(name, 1.0) * n + 0.5)  # half up, not to even
        counts.append(min(count, mix.caps.get(name, count)))
    return np.array(counts, dtype=np.int64)


def epoch_units(unit_dataset: np.ndarray, counts: np.ndarray, rng: random.Random) -> np.ndarray:
    """The units of one epoch: ``counts[d]`` of dataset d, in passes over it that are each a new random order.

    A dataset taken whole (its count equals its units) is taken as it is, without
    a draw, so data without a mix gets every unit in index order and ``rng`` untouched.
    """
    taken = []
    for dataset, count in enumerate(counts.tolist()):
        units = np.flatnonzero(unit_dataset == dataset)
        if count == len(units):
            taken.append(units)
            continue
        passes = []
        for _ in range(-(-count // len(units)) if len(units) else 0):
            shuffled = units.copy()
            rng.shuffle(shuffled)  # type: ignore[arg-type]  # an ndarray shuffles in place like a list
            passes.append(shuffled)
        taken.append(np.concatenate(passes)[:count] if passes else units[:0])
    return np.sort(np.concatenate(taken), kind="stable") if taken else unit_dataset[:0]


class _StepParts(torch.utils.data.Dataset):
    """Step -> this rank's batch of that step, whole or in GradCache chunks, for a sampler of steps."""

    def __init__(self, batches: ConversationBatches, chunk_size: int | None) -> None:
        self.batches, self.chunk_size = batches, chunk_size

    def __getitem__(self, step: int) -> list[Batch]:
        if self.chunk_size:
            return self.batches.batch_chunks(step, self.chunk_size)
        return [self.batches.batch(step)]


def _as_is(parts: list[Batch]) -> list[Batch]:
    return parts


# Where DataLoader workers hand their batches to the rank (torch's shared-memory tensors, on Linux)
SHARED_MEMORY = Path("/dev/shm")
MIB = 2**20


def batch_bytes(parts: Sequence[Batch]) -> int:
    """The bytes of every tensor of one step's batch parts: what a worker puts in shared memory for that step."""
    sides = [side for part in parts for side in (part.query, part.target, part.negative) if side is not None]
    tensors = [t for side in sides for t in side.values()] + [p.target_keys for p in parts]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_shared_memory(
    one_step_bytes: int, *, workers: int, prefetch: int, ranks_on_node: int, shared_memory: Path = SHARED_MEMORY
) -> None:
    """Raises when the batches in flight on this node cannot fit in ``shared_memory``, naming the fix.

    Every rank's ``workers`` keep ``prefetch`` steps each in shared memory; a
    container's default /dev/shm (Docker: 64 MB) holds not one batch at
    cluster image size, and the loader would die of a bus error instead.
    """
    if not workers or not shared_memory.is_dir():
        return
    in_flight = one_step_bytes * workers * prefetch * ranks_on_node
    size = shutil.disk_usage(shared_memory).total
    logger.info(
        "batches in flight: %.1f MiB per step x %d workers x prefetch %d x %d ranks on this node = %.0f MiB "
        "of %s's %.0f MiB",
        one_step_bytes / MIB, workers, prefetch, ranks_on_node, in_flight / MIB, shared_memory, size / MIB,
    )  # fmt: skip
    if in_flight > size:
        raise RuntimeError(
            f"{shared_memory} holds {size / MIB:.0f} MiB, but the batches in flight on this node need about "
            f"{in_flight / MIB:.0f} MiB ({ranks_on_node} ranks x training.data_workers={workers} x prefetch "
            f"{prefetch} x {one_step_bytes / MIB:.1f} MiB per step): give the container more shared memory "
            f"(docker run --shm-size={-(-2 * in_flight // 2**30)}g, or a Kubernetes emptyDir with medium: Memory "
            "at /dev/shm) or lower training.data_workers (0 builds batches in the rank itself)"
        )


def batch_loader(
    batches: ConversationBatches,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    workers: int = 0,
    prefetch: int = 2,
    shared_memory: Path = SHARED_MEMORY,
) -> Iterator[list[Batch]]:
    """Each step's batch parts, steps ``start`` .. ``stop - 1`` in order, made ``prefetch`` steps ahead per worker.

    The sampler is the step range itself, so step s is always batch s, with or
    without workers, and a resumed run continues exactly where it stopped.
    Records, images, the image processor and collation run in the ``workers``
    processes (0: in this one). With workers, the first step's batch is built
    here first, to check that the node's shared memory holds the batches in
    flight (``check_shared_memory``).
    """
    if workers < 0 or prefetch < 1:
        raise ValueError(f"training.data_workers must be >= 0 and prefetch >= 1, got {workers} and {prefetch}")
    steps = _StepParts(batches, chunk_size)
    if workers and start < stop:
        batches.prepare_epochs(start, stop)
        ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
        check_shared_memory(
            batch_bytes(steps[start]),
            workers=workers,
            prefetch=prefetch,
            ranks_on_node=ranks_on_node,
            shared_memory=shared_memory,
        )
    loader = torch.utils.data.DataLoader(
        steps,
        sampler=range(start, stop),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        # the workers' seeds come from this generator, not from the global one, whose state (dropout)
        # a resumed run restores from its checkpoint and must continue unchanged
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_stop_signals,  # the rank stops for them, after its step (training/preemption.py)
    )
    return iter(loader)


def _of_every(conversations: Sequence[Conversation], field: str, what: str) -> list[Any]:
    """Each conversation's ``field``; raises if some have it and some have None."""
    values = [getattr(c, field) for c in conversations]
    if any(value is None for value in values):
        raise ValueError(f"some conversations of the batch have {what} and some have none")
    return values


def _open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# One record in one epoch: its conversation, and each side's (image or None, formatted image tokens).
RowImages = dict[str, tuple[Image.Image | None, int]]


def _stage1_row(
    record: dict[str, Any], part: int, epoch: int, settings: dict[str, Any], image_pad_id: int, images: ImageStore
) -> tuple[Conversation, RowImages]:
    conversation = assemble_conversations(record, epoch, settings, image_pad_id)[part]
    image = None if record["image"] is None else _open_image(record["image"])
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
    # the columns of every record that start-up reads (from the format's record index)
    list_columns: tuple[str, ...]
    category_columns: tuple[str, ...]
    # every conversation of the records: (record, part of the record, turns) as three flat arrays
    units: Callable[[FormattedRecords], tuple[np.ndarray, np.ndarray, np.ndarray]]
    row: Callable[[dict[str, Any], int, int, dict[str, Any], int, ImageStore], tuple[Conversation, RowImages]]


def _stage1_units(records: FormattedRecords) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A unit per part of ``part_turns`` with turns (0: the part was left out), record by record."""
    turns, parts_per_record = records.list_column("part_turns")
    record = np.repeat(np.arange(records.rows, dtype=np.int64), parts_per_record)
    first_unit = np.repeat(np.cumsum(parts_per_record) - parts_per_record, parts_per_record)
    part = np.arange(len(turns), dtype=np.int64) - first_unit
    kept = turns > 0
    return record[kept], part[kept], turns[kept]


def _stage2_units(records: FormattedRecords) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # one conversation per sample, with the main and the auxiliary <|emb|>
    rows = records.rows
    return np.arange(rows, dtype=np.int64), np.zeros(rows, np.int64), np.full(rows, 2, np.int64)


RECORD_KINDS = {
    schema.SCHEMA_VERSION: RecordKind(RECORD_COLUMNS, ("part_turns",), (), _stage1_units, _stage1_row),
    mmeb_train.SCHEMA_VERSION: RecordKind(STAGE2_RECORD_COLUMNS, (), ("dataset",), _stage2_units, _stage2_row),
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
        # one row per hard negative: one per turn (stage 1) or per sample (stage 2, with its image)
        rows = [row for ids in _of_every(conversations, "negative_ids", "a hard negative") for row in ids]
        negative = collate(rows, pad_id, image_pad_id)
        if negative_images is not None:
            negative = _with_images(negative, negative_images, ids_, "hard negative", image_processor, short_side)
        negative["emb_index"] = (negative["input_ids"] == emb_id).nonzero()
        counts["hard negative"] = (negative, len(rows))
        if conversations[0].negative_key is not None:
            negative_keys = torch.tensor(
                [key for keys in _of_every(conversations, "negative_key", "a hard negative key") for key in keys],
                dtype=torch.long,
            )
    for side, (batch, expected) in counts.items():
        if batch["emb_index"].shape[0] != expected:
            raise ValueError(
                f"the {side} side holds {batch['emb_index'].shape[0]} {tokens.EMB_TOKEN} for "
                f"{len(conversations)} conversations of {turns} turns"
            )
    keys = torch.tensor([key for c in conversations for key in c.target_key], dtype=torch.long)
    turn_types = torch.tensor([kind for c in conversations for kind in c.turn_type], dtype=torch.long)
    return Batch(query, target, turns, ids_, keys, negative, negative_keys, turn_types)
