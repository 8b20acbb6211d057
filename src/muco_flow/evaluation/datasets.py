"""Readers for the evaluation formats: MMEB and held-out M3T (M-BEIR: evaluation/mbeir.py).

Every set becomes queries, a list of distinct candidates (each encoded once)
and, per query, which candidates count: for MMEB a query's own candidate list
with the first one correct; for M3T the whole pool with its positives. A
malformed file fails with the dataset, the row and the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from muco_flow.data import schema
from muco_flow.data.images import UnsafePathError, confined_path

# MMEB's files write image placeholders of their original model into the text
PLACEHOLDER = re.compile(r"<\|image_\d+\|>\s*")


class EvaluationDataError(ValueError):
    """A malformed evaluation file; the message names the dataset, row and problem."""


@dataclass(frozen=True)
class Item:
    """A query or candidate: text, an image (path relative to the set's root), or both."""

    text: str
    image: str | None = None


@dataclass
class RetrievalSet:
    name: str
    group: str  # MMEB meta-task or M3T turn type
    root: Path
    queries: list[Item] = field(default_factory=list)
    candidates: list[Item] = field(default_factory=list)
    # per query: the candidates it is ranked among (None: the whole list), and its correct ones
    candidate_lists: list[list[int] | None] = field(default_factory=list)
    positives: list[list[int]] = field(default_factory=list)

    def candidate_index(self, item: Item, index: dict[Item, int]) -> int:
        if item not in index:
            index[item] = len(self.candidates)
            self.candidates.append(item)
        return index[item]


def _check_image(root: Path, path: str, where: str) -> None:
    try:
        resolved = confined_path(root, path)
    except UnsafePathError as err:
        raise EvaluationDataError(f"{where}: {err}") from None
    if not resolved.is_file():
        raise EvaluationDataError(f"{where}: image '{path}' not found under {root}")


def read_mmeb_dataset(directory: Path, root: Path, meta_task: str) -> RetrievalSet:
    """One MMEB dataset folder: a parquet of queries, each with its candidate list (first correct)."""
    name = directory.name
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise EvaluationDataError(f"MMEB dataset {name}: no parquet file in {directory}")
    required = {"qry_inst", "qry_text", "qry_img_path", "tgt_text", "tgt_img_path"}
    result = RetrievalSet(name=name, group=meta_task, root=root)
    seen: dict[Item, int] = {}
    row_number = 0
    for file in files:
        table = pq.read_table(file)
        missing = required - set(table.column_names)
        if missing:
            raise EvaluationDataError(f"MMEB dataset {name}: {file.name} has no column(s) {sorted(missing)}")
        for row in table.select(sorted(required)).to_pylist():
            where = f"MMEB dataset {name}, row {row_number}"
            texts, images = row["tgt_text"] or [], row["tgt_img_path"] or []
            if not texts and not images:
                raise EvaluationDataError(f"{where}: the candidate list is empty")
            if texts and images and len(texts) != len(images):
                raise EvaluationDataError(f"{where}: {len(texts)} candidate texts but {len(images)} candidate images")
            count = max(len(texts), len(images))
            texts, images = texts or [""] * count, images or [""] * count
            query_text = "\n".join(
                t for t in (PLACEHOLDER.sub("", row["qry_inst"] or ""), PLACEHOLDER.sub("", row["qry_text"] or "")) if t
            )
            query = Item(query_text, row["qry_img_path"] or None)
            if not query.text and not query.image:
                raise EvaluationDataError(f"{where}: the query has neither text nor image")
            candidates = [Item(PLACEHOLDER.sub("", t or ""), i or None) for t, i in zip(texts, images, strict=True)]
            for item in [query, *candidates]:
                if item.image:
                    _check_image(root, item.image, where)
                elif not item.text:
                    raise EvaluationDataError(f"{where}: a candidate has neither text nor image")
            indices = [result.candidate_index(c, seen) for c in candidates]
            # a duplicate of the correct candidate is also correct; ranks count distinct candidates
            distinct = list(dict.fromkeys(indices))
            result.queries.append(query)
            result.candidate_lists.append(distinct)
            result.positives.append([indices[0]])
            row_number += 1
    if not result.queries:
        raise EvaluationDataError(f"MMEB dataset {name}: no rows")
    return result


def read_mmeb(directory: Path, root: Path, meta_tasks: dict[str, str]) -> list[RetrievalSet]:
    """Every dataset folder under ``directory``; each must have a meta-task."""
    folders = sorted(p for p in Path(directory).iterdir() if p.is_dir())
    if not folders:
        raise EvaluationDataError(f"MMEB: no dataset folders in {directory}")
    invalid = sorted({task for task in meta_tasks.values() if task not in schema.MMEB_META_TASKS})
    if invalid:
        raise EvaluationDataError(f"MMEB: unknown meta-task(s) {invalid}; use {list(schema.MMEB_META_TASKS)}")
    unknown = [f.name for f in folders if f.name not in meta_tasks]
    if unknown:
        raise EvaluationDataError(f"MMEB: no meta-task for dataset(s) {unknown}; add them to evaluate.mmeb.meta_tasks")
    return [read_mmeb_dataset(folder, root, meta_tasks[folder.name]) for folder in folders]


def read_m3t_heldout(meta_file: Path, root: Path) -> list[RetrievalSet]:
    """One set per turn type: each turn's first phrasing against every distinct target of that type."""
    table = pq.read_table(meta_file, columns=[schema.QRY, schema.POS_TEXT, schema.QRY_IMAGE_PATH])
    sets: dict[str, RetrievalSet] = {}
    seen: dict[str, dict[Item, int]] = {}
    for number, row in enumerate(table.to_pylist()):
        where = f"held-out M3T {meta_file.name}, row {number}"
        if len(row[schema.QRY]) != len(schema.M3T_TURN_TYPES) or len(row[schema.POS_TEXT]) != len(row[schema.QRY]):
            raise EvaluationDataError(f"{where}: expected {len(schema.M3T_TURN_TYPES)} turns")
        _check_image(root, row[schema.QRY_IMAGE_PATH], where)
        for turn, (phrasings, target) in enumerate(zip(row[schema.QRY], row[schema.POS_TEXT], strict=True)):
            group = schema.M3T_TURN_TYPES[turn].name.lower()
            current = sets.setdefault(group, RetrievalSet(name=f"M3T-{group}", group=group, root=root))
            index = current.candidate_index(Item(target), seen.setdefault(group, {}))
            current.queries.append(Item(phrasings[0], row[schema.QRY_IMAGE_PATH]))
            current.candidate_lists.append(None)
            current.positives.append([index])
    return list(sets.values())
