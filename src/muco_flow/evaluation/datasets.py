"""Retrieval sets, the common shape of the evaluation formats, and held-out M3T.

Every set becomes queries, a list of distinct candidates (each encoded once)
and, per query, which candidates count: for MMEB (evaluation/mmeb.py) a
query's own candidate list with the first one correct; for M3T the whole pool
with its positives (M-BEIR: evaluation/mbeir.py). A malformed file fails with
the dataset, the row and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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


def check_image(root: Path, path: str, where: str) -> None:
    try:
        resolved = confined_path(root, path)
    except UnsafePathError as err:
        raise EvaluationDataError(f"{where}: {err}") from None
    if not resolved.is_file():
        raise EvaluationDataError(f"{where}: image '{path}' not found under {root}")


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
