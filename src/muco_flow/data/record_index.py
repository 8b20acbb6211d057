"""The formatted records' index: what a training rank needs of every record, in one small file.

A rank's start-up needs, for every record, only how its record batches are
laid out and one or two small columns (stage 1: each conversation's turns;
stage 2: each sample's dataset). Reading them from the record files pages in
the whole record set on every rank (the columns sit between the token lists,
and the kernel reads around each page it faults), while each rank then uses
only its share. The format pipeline writes them once into `record_index.npz`
beside the manifest; a rank reads that file and opens a record file only for
the records of its own batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

INDEX_FILE = "record_index.npz"


@dataclass(frozen=True)
class RecordIndex:
    """Rows per record batch (manifest order, file by file), and the indexed columns of every record."""

    batches_per_file: np.ndarray  # int64 [files]
    batch_rows: np.ndarray  # int64 [record batches]
    # a list<int> column: its values, flat, and each record's length
    lists: dict[str, tuple[np.ndarray, np.ndarray]]
    # a string column: each record's code into its sorted distinct values, and those values
    categories: dict[str, tuple[np.ndarray, list[str]]]

    @property
    def rows(self) -> int:
        return int(self.batch_rows.sum())

    def save(self, directory: Path) -> None:
        arrays: dict[str, np.ndarray] = {"batches_per_file": self.batches_per_file, "batch_rows": self.batch_rows}
        for name, (values, lengths) in self.lists.items():
            arrays[f"list.{name}.values"], arrays[f"list.{name}.lengths"] = values, lengths
        for name, (codes, names) in self.categories.items():
            arrays[f"category.{name}.codes"], arrays[f"category.{name}.names"] = codes, np.array(names, dtype=str)
        with open(Path(directory) / INDEX_FILE, "wb") as file:  # np.savez on a path would add ".npz" to a rename
            np.savez(file, **arrays)  # type: ignore[arg-type]  # numpy's stub types the keywords as allow_pickle

    @classmethod
    def load(cls, directory: Path) -> RecordIndex:
        path = Path(directory) / INDEX_FILE
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
        lists, categories = {}, {}
        for key in arrays:
            kind, name, part = key.rsplit(".", 2) if key.count(".") >= 2 else ("", key, "")
            if kind == "list" and part == "values":
                lists[name] = (arrays[key].astype(np.int64), arrays[f"list.{name}.lengths"].astype(np.int64))
            elif kind == "category" and part == "codes":
                categories[name] = (arrays[key].astype(np.int64), arrays[f"category.{name}.names"].tolist())
        index = cls(arrays["batches_per_file"], arrays["batch_rows"], lists, categories)
        index.check(path)
        return index

    def check(self, path: Path) -> None:
        """Every indexed column has a value per record: a truncated or hand-edited index is named, not used."""
        rows = self.rows
        wrong = [name for name, (_, lengths) in self.lists.items() if len(lengths) != rows]
        wrong += [name for name, (codes, _) in self.categories.items() if len(codes) != rows]
        if wrong:
            raise ValueError(f"{path}: column {', '.join(wrong)} does not have one value per record ({rows}); "
                             "re-run the format pipeline")  # fmt: skip


def scan_record_files(
    paths: list[Path], list_columns: tuple[str, ...] = (), category_columns: tuple[str, ...] = ()
) -> RecordIndex:
    """The index of the Arrow IPC record files ``paths`` (in manifest order), read from the files themselves."""
    batches_per_file, batch_rows = [], []
    list_parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {name: ([], []) for name in list_columns}
    category_chunks: dict[str, list[Any]] = {name: [] for name in category_columns}
    for path in paths:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        batches_per_file.append(reader.num_record_batches)
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            batch_rows.append(batch.num_rows)
            for name, (values, lengths) in list_parts.items():
                column = batch.column(name)
                offsets = column.offsets.to_numpy()
                flat = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
                values.append(flat.astype(np.int64))
                lengths.append(np.diff(offsets).astype(np.int64))
            for name, chunks in category_chunks.items():
                chunks.append(batch.column(name))
    empty = np.zeros(0, np.int64)
    lists = {
        name: (np.concatenate(values) if values else empty, np.concatenate(lengths) if lengths else empty)
        for name, (values, lengths) in list_parts.items()
    }
    categories = {}
    for name, chunks in category_chunks.items():
        column = pa.chunked_array(chunks, type=pa.string())
        names = sorted(column.unique().to_pylist())
        codes = pc.index_in(column, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False)
        categories[name] = (np.asarray(codes, dtype=np.int64), names)
    return RecordIndex(np.array(batches_per_file, np.int64), np.array(batch_rows, np.int64), lists, categories)
