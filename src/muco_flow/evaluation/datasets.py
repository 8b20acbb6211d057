"""Retrieval sets, the common shape of every evaluation format, and held-out M3T.

Every set becomes queries, a list of distinct candidates (each encoded once)
and, per query, which candidates count: for MMEB (evaluation.mmeb) a query's
own candidate list with the first one correct; for M-BEIR and M3T the whole
pool with its positives. A malformed file fails with the dataset, the row and
the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from muco_flow.data import schema
from muco_flow.data.images import UnsafePathError, confined_path


class EvaluationDataError(ValueError):
    """A malformed evaluation file; the message names the dataset, row and problem."""


@dataclass(frozen=True)
class Item:
    """A query or candidate: text, an image (path relative to the set's root), or both.

    The text marks where the image goes (``<|image_1|>``, ``<|image_pad|>``),
    else the image goes first: see modeling.prompt.single_turn_text.
    """

    text: str
    image: str | None = None


@dataclass
class RetrievalSet:
    name: str
    group: str  # MMEB meta-task, M3T turn type, or "mbeir"
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


def check_image(root: Path, path: str, where: str) -> None:
    try:
        resolved = confined_path(root, path)
    except UnsafePathError as err:
        raise EvaluationDataError(f"{where}: {err}") from None
    if not resolved.is_file():
        raise EvaluationDataError(f"{where}: image '{path}' not found under {root}")


def _jsonl(path: Path, keys: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvaluationDataError(f"M-BEIR {what} {path.name}, line {number + 1}: not JSON ({err})") from None
        missing = [k for k in keys if k not in record]
        if missing:
            raise EvaluationDataError(f"M-BEIR {what} {path.name}, line {number + 1}: missing {missing}")
        records.append(record)
    return records


def read_mbeir(queries_file: Path, pool_file: Path, root: Path, name: str = "M-BEIR") -> RetrievalSet:
    """Queries scored against one global candidate pool."""
    pool = _jsonl(pool_file, schema.MBEIR_POOL_KEYS, "pool")
    queries = _jsonl(queries_file, schema.MBEIR_QUERY_KEYS, "queries")
    result = RetrievalSet(name=name, group="mbeir", root=root)
    seen: dict[Item, int] = {}
    by_did: dict[str, int] = {}
    for number, c in enumerate(pool):
        item = Item(c["txt"] or "", c["img_path"] or None)
        where = f"M-BEIR pool {pool_file.name}, line {number + 1} (did {c['did']})"
        if item.image:
            check_image(root, item.image, where)
        elif not item.text:
            raise EvaluationDataError(f"{where}: the candidate has neither text nor image")
        by_did[c["did"]] = result.candidate_index(item, seen)
    for number, q in enumerate(queries):
        where = f"M-BEIR queries {queries_file.name}, line {number + 1} (qid {q['qid']})"
        if not q["pos_cand_list"]:
            raise EvaluationDataError(f"{where}: pos_cand_list is empty")
        unknown = [d for d in q["pos_cand_list"] if d not in by_did]
        if unknown:
            raise EvaluationDataError(f"{where}: positive(s) {unknown} are not in the candidate pool")
        item = Item(q["query_txt"] or "", q["query_img_path"] or None)
        if item.image:
            check_image(root, item.image, where)
        elif not item.text:
            raise EvaluationDataError(f"{where}: the query has neither text nor image")
        result.queries.append(item)
        result.candidate_lists.append(None)
        result.positives.append(sorted({by_did[d] for d in q["pos_cand_list"]}))
    return result


def read_m3t_heldout(meta_file: Path, root: Path) -> list[RetrievalSet]:
    """One set per turn type: each turn's first phrasing against every distinct target of that type."""
    table = pq.read_table(meta_file, columns=[schema.QRY, schema.POS_TEXT, schema.QRY_IMAGE_PATH])
    sets: dict[str, RetrievalSet] = {}
    seen: dict[str, dict[Item, int]] = {}
    for number, row in enumerate(table.to_pylist()):
        where = f"held-out M3T {meta_file.name}, row {number}"
        if len(row[schema.QRY]) != len(schema.M3T_TURN_TYPES) or len(row[schema.POS_TEXT]) != len(row[schema.QRY]):
            raise EvaluationDataError(f"{where}: expected {len(schema.M3T_TURN_TYPES)} turns")
        image = row[schema.QRY_IMAGE_PATH] or None  # a text-only sample has ""
        if image:
            check_image(root, image, where)
        for turn, (phrasings, target) in enumerate(zip(row[schema.QRY], row[schema.POS_TEXT], strict=True)):
            group = schema.M3T_TURN_TYPES[turn].name.lower()
            current = sets.setdefault(group, RetrievalSet(name=f"M3T-{group}", group=group, root=root))
            index = current.candidate_index(Item(target), seen.setdefault(group, {}))
            # the phrasing's <|image_1|> marks where the image goes, as in training's first turn
            current.queries.append(Item(phrasings[0], image))
            current.candidate_lists.append(None)
            current.positives.append([index])
    return list(sets.values())
