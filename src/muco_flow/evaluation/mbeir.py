"""M-BEIR as UniIR evaluates it: the download's layout, its instructions, recall per task and pool.

The layout under the M-BEIR root (every path inside the files, images
included, is relative to that root):

    query/<split>/mbeir_<task>_<split>.jsonl       queries of one task, e.g. mbeir_mscoco_task0_test.jsonl
    cand_pool/local/mbeir_<pool>_cand_pool.jsonl   a task's own pool, e.g. mbeir_mscoco_task0_test_cand_pool.jsonl
    cand_pool/global/mbeir_union_test_cand_pool.jsonl   the union of the local pools
    instructions/query_instructions.tsv            prompts per (dataset id, query modality, candidate modality)

A query's text is UniIR's: one of its key's prompts, then the query text,
normalised as UniIR normalises it (``format_string``). UniIR draws the prompt
uniformly at random each time it loads a query; here the draw is fixed by
``instruction_seed`` and the qid, so a query gets the same text in every run
and for every model.

Recall@k is UniIR's: 1 if any positive (``pos_cand_list``) is in the top k,
averaged over the task's queries. Positives never rank against each other;
a positive absent from the searched pool cannot be hit, and a query none of
whose positives is there scores 0 but still counts. UniIR leaves ties to
FAISS's order; here a non-positive scoring as high as the best positive ranks
before it, so the figure is the lowest any tie order could give.

A candidate pool is held as columns (``PoolFile``): each candidate's line
offset in its file, its did and its modality, about 25 bytes a candidate
instead of ~1.4 KB of Python objects (issue 28: 7.2 GiB per rank for the
5.6M-candidate global pool). Every line is checked when the pool is read;
its text and image path are read again, from the file, only when the
candidate is encoded.
"""

from __future__ import annotations

import array
import json
import logging
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, TypeVar, overload

import numpy as np
import torch

from muco_flow.evaluation.datasets import EvaluationDataError, Item, check_image
from muco_flow.evaluation.encoded_pool import VectorPool
from muco_flow.evaluation.metrics import any_hit_recall_at_k
from muco_flow.evaluation.retrieval import QueryShare, chunked_positive_ranks

logger = logging.getLogger(__name__)

QUERY_FIELDS = (
    "qid",
    "query_txt",
    "query_img_path",
    "query_modality",
    "query_src_content",
    "pos_cand_list",
    "neg_cand_list",
    "task_id",
)
POOL_FIELDS = ("did", "txt", "img_path", "modality", "src_content")
# What scoring needs; the other fields may be missing, and text or image may be null where the modality allows
REQUIRED_QUERY_FIELDS = ("qid", "query_modality", "pos_cand_list", "task_id")
REQUIRED_POOL_FIELDS = ("did", "modality")
TEXT, IMAGE, IMAGE_TEXT = "text", "image", "image,text"
MODALITIES = (TEXT, IMAGE, IMAGE_TEXT)
# UniIR's task ids by (query modality, candidate modality); 5 is unused
TASK_IDS = {
    (TEXT, IMAGE): 0,
    (TEXT, TEXT): 1,
    (TEXT, IMAGE_TEXT): 2,
    (IMAGE, TEXT): 3,
    (IMAGE, IMAGE): 4,
    (IMAGE_TEXT, TEXT): 6,
    (IMAGE_TEXT, IMAGE): 7,
    (IMAGE_TEXT, IMAGE_TEXT): 8,
}
# The instruction file's columns; prompt_1, prompt_2, ... follow (empty cells are no prompt)
INSTRUCTION_COLUMNS = ("query_modality", "cand_modality", "dataset_name", "dataset_id")
INSTRUCTIONS_FILE = "instructions/query_instructions.tsv"
GLOBAL_POOL_FILE = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
IMAGES_DIR = "mbeir_images"
POOL_KINDS = ("local", "global")
# "<dataset id>:<index>", for qids and dids alike
ID_PATTERN = re.compile(r"\d+:\d+")


def query_file(task: str, split: str = "test") -> str:
    return f"query/{split}/mbeir_{task}_{split}.jsonl"


def local_pool_file(pool: str) -> str:
    return f"cand_pool/local/mbeir_{pool}_cand_pool.jsonl"


def format_string(text: str | None) -> str:
    """UniIR's normalisation of every text: trimmed, first letter upper-case, final '.' unless . ? or !"""
    text = (text or "").replace("\r", "").strip().strip('"')
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def instructed_query_text(prompt: str, query_text: str | None) -> str:
    """The prompt, a space and the query text, as UniIR joins them (only the prompt for an image query)."""
    return format_string(f"{format_string(prompt)} {query_text or ''}")


@dataclass(frozen=True)
class CandidatePool:
    """A pool file: one candidate per did, duplicates of the same content included.

    ``read_pool`` fills it with a PoolFile's columns; plain lists and a dict
    (a pool made by hand) do as well.
    """

    name: str
    dids: Sequence[str]
    items: Sequence[Item]
    modalities: Sequence[str]
    rows: Mapping[str, int] = field(repr=False)  # did -> row


T = TypeVar("T")


class Column(Sequence[T]):
    """A read-only sequence of ``length`` values, each read by ``read`` (a range of rows) when asked for."""

    # rows read at once while iterating: one open file and one seek per row, a bounded list
    ITER_ROWS = 4096

    def __init__(self, length: int, read: Callable[[range], list[T]]) -> None:
        self.length, self.read = length, read

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return self.read(range(self.length)[index])
        if not -self.length <= index < self.length:
            raise IndexError(f"row {index} of {self.length}")
        return self.read(range(index % self.length, index % self.length + 1))[0]

    def __iter__(self) -> Iterator[T]:
        for start in range(0, self.length, self.ITER_ROWS):
            yield from self.read(range(start, min(start + self.ITER_ROWS, self.length)))


def _indices(rows: range) -> np.ndarray:
    return np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)


class DidRows(Mapping[str, int]):
    """did -> row over a PoolFile's did column, by binary search in its sorted order (no dict of strings)."""

    def __init__(self, pool_file: PoolFile) -> None:
        self.pool_file = pool_file

    def __getitem__(self, did: str) -> int:
        keys, order = self.pool_file.did_keys, self.pool_file.did_order
        key = did.encode() if isinstance(did, str) else b""
        if not key or len(key) > keys.itemsize:
            raise KeyError(did)
        at = int(np.searchsorted(keys, key, sorter=order))
        if at == len(order) or keys[order[at]] != key:
            raise KeyError(did)
        return int(order[at])

    def __iter__(self) -> Iterator[str]:
        return iter(self.pool_file.dids())

    def __len__(self) -> int:
        return len(self.pool_file.offsets)


class PoolFile:
    """A checked pool file as columns: each candidate's byte offset, did (fixed-width bytes) and modality code.

    ``did_order`` sorts the dids, for DidRows' look-ups. ``items`` reads
    candidates' lines again (one seek each) and checks that each still has
    the did it had when read, so a file changed since reads as an error, not
    as another candidate's item.
    """

    def __init__(self, root: Path, path: Path, offsets: np.ndarray, did_keys: np.ndarray, modality_codes: np.ndarray):
        self.root, self.path = root, path
        self.offsets, self.did_keys, self.modality_codes = offsets, did_keys, modality_codes
        order = np.argsort(did_keys, kind="stable")
        self.did_order = order.astype(np.int32) if len(order) < 2**31 else order

    # the columns read through bound methods, not lambdas: the sets are pickled to ParallelRunner's processes
    def dids(self) -> Column[str]:
        return Column(len(self.offsets), self._read_dids)

    def modalities(self) -> Column[str]:
        return Column(len(self.offsets), self._read_modalities)

    def _read_dids(self, rows: range) -> list[str]:
        return [key.decode() for key in self.did_keys[_indices(rows)]]

    def _read_modalities(self, rows: range) -> list[str]:
        return [MODALITIES[c] for c in self.modality_codes[_indices(rows)]]

    def items(self) -> Column[Item]:
        return Column(len(self.offsets), self._read_items)

    def _read_items(self, rows: range) -> list[Item]:
        items = []
        with self.path.open("rb") as file:
            for row in rows:
                file.seek(int(self.offsets[row]))
                try:
                    record = json.loads(file.readline())
                except ValueError:  # not JSON, or not UTF-8: the offset no longer starts a line
                    record = None
                if not isinstance(record, dict) or record.get("did") != self.did_keys[row].decode():
                    raise EvaluationDataError(
                        f"M-BEIR {self.path}: changed since it was read (row {row} no longer has did "
                        f"{self.did_keys[row].decode()}); read the pool again"
                    )
                items.append(_candidate_item(record))
        return items

    def duplicate(self) -> tuple[str, int] | None:
        """The first did that appears twice, and the line of its second appearance; None if every did is once."""
        ordered = self.did_keys[self.did_order]
        repeats = np.flatnonzero(ordered[1:] == ordered[:-1])
        if not repeats.size:
            return None
        row = int(self.did_order[repeats + 1].min())
        with self.path.open("rb") as file:
            line = file.read(int(self.offsets[row])).count(b"\n") + 1
        return self.did_keys[row].decode(), line

    def pool(self, name: str) -> CandidatePool:
        return CandidatePool(name, self.dids(), self.items(), self.modalities(), DidRows(self))


@dataclass(frozen=True)
class MBeirTask:
    """One query file, its local pool and the recall cut-offs reported for it."""

    name: str
    task_id: int
    local_pool: str
    recall_ks: tuple[int, ...]
    average_k: int
    qids: list[str]
    queries: list[Item]
    positives: list[list[str]]  # each query's pos_cand_list


@dataclass(frozen=True)
class MBeirBenchmark:
    root: Path
    tasks: list[MBeirTask]
    pools: tuple[str, ...]  # the pool kinds scored: local, global
    local_pools: dict[str, CandidatePool]
    global_pool: CandidatePool | None

    def candidate_pool(self, kind: str, task: MBeirTask) -> CandidatePool:
        """The pool ``task`` is ranked against: its local pool, or for ``global`` the union pool."""
        if kind != "global":
            return self.local_pools[task.local_pool]
        if self.global_pool is None:
            raise ValueError(f"M-BEIR: the global pool is scored but was not read (pools {self.pools})")
        return self.global_pool


def _file_label(root: Path, path: Path) -> str:
    return f"M-BEIR {path.relative_to(root) if path.is_relative_to(root) else path}"


def _where(root: Path, path: Path, line: int) -> str:
    return f"{_file_label(root, path)}, line {line}"


def _jsonl(root: Path, path: Path, required: Sequence[str]) -> Iterator[tuple[str, dict[str, Any], int]]:
    """Each record with the place it came from, for messages, and its line's byte offset; read as iterated."""
    if not path.is_file():
        raise EvaluationDataError(f"M-BEIR: {path} does not exist")
    records = 0
    label = _file_label(root, path)  # once per file: per line, it took a fifth of the reading
    with path.open("rb") as lines:
        offset = 0
        for number, raw in enumerate(lines, start=1):
            line_offset, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = f"{label}, line {number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise EvaluationDataError(f"{where}: not UTF-8 ({err})") from None
            except json.JSONDecodeError as err:
                raise EvaluationDataError(f"{where}: not JSON ({err})") from None
            if not isinstance(record, dict):
                raise EvaluationDataError(f"{where}: not a JSON object")
            missing = [k for k in required if k not in record]
            if missing:
                raise EvaluationDataError(f"{where}: missing {missing}")
            records += 1
            yield where, record, line_offset
    if not records:
        raise EvaluationDataError(f"M-BEIR: {path} has no records")


def _optional_string(record: dict[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise EvaluationDataError(f"{where}: {key} must be a string or null, got {value!r}")
    return value or None


def _id(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise EvaluationDataError(f"{where}: {key} must be '<dataset id>:<index>', got {value!r}")
    return value


def _item(root: Path, record: dict[str, Any], keys: tuple[str, str, str], where: str) -> tuple[Item, str]:
    """The text and image a record's modality names (both must be there), and that modality."""
    text_key, image_key, modality_key = keys
    text, image = _optional_string(record, text_key, where), _optional_string(record, image_key, where)
    modality = record[modality_key]
    if modality not in MODALITIES:
        raise EvaluationDataError(f"{where}: {modality_key} must be one of {list(MODALITIES)}, got {modality!r}")
    if TEXT in modality.split(",") and not text:
        raise EvaluationDataError(f"{where}: {modality_key} '{modality}' but {text_key} is empty")
    if IMAGE in modality.split(",") and not image:
        raise EvaluationDataError(f"{where}: {modality_key} '{modality}' but {image_key} is empty")
    if image:
        check_image(root, image, where)
    return Item(text or "", image), modality


def _candidate_item(record: dict[str, Any]) -> Item:
    """A pool record's item: candidates are never instructed, their text is only normalised."""
    return Item(format_string(record.get("txt")), record.get("img_path") or None)


def read_pool(root: Path, path: Path, name: str) -> CandidatePool:
    """A local or global pool file, every line checked; a did may appear once.

    The pool keeps columns (PoolFile), not the records: each line's dids
    are gathered ``chunk`` at a time into fixed-width bytes, so even while
    reading no Python object per candidate outlives its chunk.
    """
    chunk = 65536
    offsets = array.array("q")
    codes = bytearray()
    did_chunks: list[np.ndarray] = []
    dids: list[str] = []
    for where, record, offset in _jsonl(root, path, REQUIRED_POOL_FIELDS):
        did = _id(record["did"], "did", where)
        _, modality = _item(root, record, ("txt", "img_path", "modality"), where)
        offsets.append(offset)
        codes.append(MODALITIES.index(modality))
        dids.append(did)
        if len(dids) == chunk:
            did_chunks.append(np.array([d.encode() for d in dids], dtype=np.bytes_))
            dids = []
    did_chunks.append(np.array([d.encode() for d in dids], dtype=np.bytes_))
    width = max(c.dtype.itemsize for c in did_chunks)
    pool_file = PoolFile(
        root,
        path,
        np.frombuffer(offsets, dtype=np.int64).copy(),
        np.concatenate([c.astype(f"S{width}") for c in did_chunks]),
        np.frombuffer(bytes(codes), dtype=np.uint8).copy(),
    )
    if repeated := pool_file.duplicate():
        did, line = repeated
        raise EvaluationDataError(f"{_where(root, path, line)}: did {did} appears twice in the pool")
    return pool_file.pool(name)


def read_instructions(path: Path) -> dict[tuple[str, str, str], list[str]]:
    """Prompts by (dataset id, query modality, candidate modality); the header line is skipped."""
    if not path.is_file():
        raise EvaluationDataError(f"M-BEIR: the instruction file {path} does not exist")
    prompts: dict[tuple[str, str, str], list[str]] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if number == 1 or not line.strip():
                continue
            where = f"M-BEIR instructions {path.name}, line {number}"
            cells = [c.strip() for c in line.split("\t")]
            if len(cells) <= len(INSTRUCTION_COLUMNS):
                raise EvaluationDataError(
                    f"{where}: expected {', '.join(INSTRUCTION_COLUMNS)} and a prompt, got {len(cells)} cells"
                )
            query_modality, cand_modality, _, dataset_id = cells[: len(INSTRUCTION_COLUMNS)]
            key = (dataset_id, query_modality, cand_modality)
            texts = [c for c in cells[len(INSTRUCTION_COLUMNS) :] if c]
            if not texts:
                raise EvaluationDataError(f"{where}: no prompt for {key}")
            if key in prompts:
                # UniIR keeps the last row of a key too
                logger.warning("%s: a second row for %s replaces the first", where, key)
            prompts[key] = texts
    return prompts


def _read_task(
    root: Path,
    name: str,
    split: str,
    local_pool: CandidatePool,
    instructions: dict[tuple[str, str, str], list[str]] | None,
    seed: int,
    recall_ks: tuple[int, ...],
    average_k: int,
) -> MBeirTask:
    path = root / query_file(name, split)
    qids, queries, positives, task_ids = [], [], [], set()
    for where, record, _ in _jsonl(root, path, REQUIRED_QUERY_FIELDS):
        qid = _id(record["qid"], "qid", where)
        where = f"{where} (qid {qid})"
        item, modality = _item(root, record, ("query_txt", "query_img_path", "query_modality"), where)
        task_id = record["task_id"]
        if not isinstance(task_id, int) or isinstance(task_id, bool) or task_id not in TASK_IDS.values():
            raise EvaluationDataError(f"{where}: task_id must be one of {sorted(TASK_IDS.values())}, got {task_id!r}")
        task_ids.add(task_id)
        wanted = record["pos_cand_list"]
        if not isinstance(wanted, list) or not wanted:
            raise EvaluationDataError(f"{where}: pos_cand_list must be a non-empty list of dids")
        wanted = [_id(did, "pos_cand_list", where) for did in wanted]
        if not isinstance(record.get("neg_cand_list", []), list):
            raise EvaluationDataError(f"{where}: neg_cand_list must be a list of dids")
        # UniIR looks up one positive of the query's own dataset in the local pool (only those: OVEN's
        # and InfoSeek's lists hold the other's dids) and fails if it is missing; its modality keys the prompt
        dataset_id = qid.split(":")[0]
        local = [d for d in wanted if d.split(":")[0] == dataset_id and d in local_pool.rows]
        if not local:
            raise EvaluationDataError(
                f"{where}: no positive of dataset {dataset_id} is in the local pool {local_pool.name}"
            )
        if instructions is None:
            text = format_string(item.text)
        else:
            rng = random.Random(f"{seed}:{qid}")
            key = (dataset_id, modality, local_pool.modalities[local_pool.rows[rng.choice(local)]])
            if key not in instructions:
                raise EvaluationDataError(f"{where}: the instruction file has no prompt for {key}")
            text = instructed_query_text(rng.choice(instructions[key]), item.text)
        qids.append(qid)
        queries.append(Item(text, item.image))
        positives.append(list(dict.fromkeys(wanted)))
    if len(task_ids) > 1:
        raise EvaluationDataError(
            f"M-BEIR {path.relative_to(root)}: one task per file, got task ids {sorted(task_ids)}"
        )
    return MBeirTask(name, task_ids.pop(), local_pool.name, recall_ks, average_k, qids, queries, positives)


def read_mbeir(
    root: Path,
    tasks: Sequence[str],
    *,
    local_pools: Mapping[str, str] | None = None,
    split: str = "test",
    instructions: str | None = INSTRUCTIONS_FILE,
    instruction_seed: int = 2023,
    global_pool: str = GLOBAL_POOL_FILE,
    pools: Sequence[str] = POOL_KINDS,
    recall_ks: Mapping[str, Sequence[int]] | None = None,
    average_k: Mapping[str, int] | None = None,
) -> MBeirBenchmark:
    """The configured tasks (query-file names) of an M-BEIR download at ``root``.

    A task's local pool has the task's name unless ``local_pools`` names
    another (MSCOCO's carry a ``_test`` suffix). ``recall_ks`` and
    ``average_k`` map a task to its cut-offs and to the one
    the M-BEIR average takes, with a ``default`` entry; ``instructions`` None
    scores the queries without prompts (UniIR's enable_query_instruct false).
    """
    root = Path(root)
    if not tasks:
        raise EvaluationDataError("M-BEIR: no tasks configured (evaluate.mbeir.tasks)")
    unknown = [p for p in pools if p not in POOL_KINDS]
    if unknown or not pools:
        raise EvaluationDataError(f"M-BEIR: pools must be some of {list(POOL_KINDS)}, got {list(pools)}")
    recall_ks = {"default": (1, 5, 10), **(recall_ks or {})}
    average_k = {"default": 5, **(average_k or {})}
    prompts = read_instructions(root / instructions) if instructions else None
    if len(set(tasks)) != len(tasks):
        raise EvaluationDataError(f"M-BEIR: a task is listed twice in {list(tasks)}")
    pools_read: dict[str, CandidatePool] = {}
    read_tasks = []
    for name in tasks:
        pool_name = (local_pools or {}).get(name, name)
        if pool_name not in pools_read:
            pools_read[pool_name] = read_pool(root, root / local_pool_file(pool_name), pool_name)
        ks = tuple(sorted(recall_ks.get(name, recall_ks["default"])))
        k = average_k.get(name, average_k["default"])
        if k not in ks:
            raise EvaluationDataError(f"M-BEIR task {name}: average_k {k} is not among its recall_ks {list(ks)}")
        read_tasks.append(_read_task(root, name, split, pools_read[pool_name], prompts, instruction_seed, ks, k))
    union = read_pool(root, root / global_pool, "global") if "global" in pools else None
    return MBeirBenchmark(root, read_tasks, tuple(pools), pools_read, union)


def score_mbeir(
    benchmark: MBeirBenchmark,
    vectors: Callable[[Sequence[Item], Path], torch.Tensor],
    pool_vectors: Callable[[Sequence[Item], Path], VectorPool],
    curve_ks: Sequence[int],
    share: QueryShare | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Recall per task and pool kind, the M-BEIR average per pool kind, and recall curves.

    ``vectors`` encodes the queries and ``pool_vectors`` a candidate pool (an
    EncodingCache's ``vectors`` and ``pool``). The average is UniIR's
    reporting convention: the unweighted mean over tasks of each task's
    ``average_k`` recall. With ``share``, this rank encodes and scores its
    part of each task's queries, and every rank ends with every query's ranks.
    """
    share = share or QueryShare()
    rows: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, float]] = {}
    for kind in benchmark.pools:
        rows[kind] = {}
        for task in benchmark.tasks:
            pool = benchmark.candidate_pool(kind, task)
            positives = [sorted({pool.rows[d] for d in dids if d in pool.rows}) for dids in task.positives]
            part = share.part(len(task.queries))
            ranks = share.merged(
                chunked_positive_ranks(
                    vectors(task.queries[part], benchmark.root),
                    pool_vectors(pool.items, benchmark.root),
                    positives[part],
                    ignore_other_positives=True,
                    device=share.device,
                )
            )
            unreachable = sum(not p for p in positives)
            if unreachable:
                logger.warning(
                    "M-BEIR %s: %d of %d queries have no positive in the %s pool; they count as misses",
                    task.name, unreachable, len(positives), kind,
                )  # fmt: skip
            rows[kind][task.name] = {
                "task_id": task.task_id,
                "pool": pool.name,
                **{f"recall@{k}": any_hit_recall_at_k(ranks, k) for k in task.recall_ks},
                "queries": len(ranks),
                "candidates": len(pool.items),
                "queries_without_positive_in_pool": unreachable,
            }
            curves[f"M-BEIR {task.name} ({kind})"] = {str(k): any_hit_recall_at_k(ranks, k) for k in curve_ks}
    average = {
        kind: mean(rows[kind][t.name][f"recall@{t.average_k}"] for t in benchmark.tasks) for kind in benchmark.pools
    }
    average_metrics = {t.name: f"recall@{t.average_k}" for t in benchmark.tasks}
    return {"rows": rows, "average": average, "average_metrics": average_metrics}, curves
