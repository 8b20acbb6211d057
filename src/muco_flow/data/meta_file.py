"""Reading an input parquet file so that a damaged file fails cleanly and a damaged row is only that row.

Whole-file faults (not parquet at all, truncated, empty, two files joined,
a corrupt row group, a page whose checksum does not match, duplicate column
names) raise ``MetaFileError`` naming the file and the problem; the pipeline
node turns it into a one-line failure. A row whose values Arrow cannot turn
into Python (invalid UTF-8 in a string column) is returned as an
``UndecodableRow`` so that ingestion rejects that row alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_MAGIC = b"PAR1"


class MetaFileError(ValueError):
    """An input parquet file that cannot be read as a whole; the message names the file."""


@dataclass(frozen=True)
class UndecodableRow:
    """A row with a value Arrow holds but Python cannot decode; why, naming the column."""

    column: str
    message: str


def open_parquet(path: Path, label: str | None = None) -> pq.ParquetFile:
    """``path`` opened for streaming, with page checksums verified where the file has them.

    ``label`` names the file in errors (for example the snapshot URI and the
    meta file's path below it); the local path by default.
    """
    path, label = Path(path), label or str(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise MetaFileError(f"{label}: cannot be read: {err.strerror}") from None
    if size == 0:
        raise MetaFileError(f"{label}: the file is empty (0 bytes), not a parquet file")
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        what = "does not start" if head != PARQUET_MAGIC else "does not end"
        raise MetaFileError(
            f"{label}: not a parquet file: it {what} with the parquet marker 'PAR1' "
            "(a truncated copy, or another format such as CSV under a .parquet name)"
        )
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        raise MetaFileError(f"{label}: not a readable parquet file: {err}") from None
    duplicates = sorted(name for name, n in Counter(parquet.schema_arrow.names).items() if n > 1)
    if duplicates:
        raise MetaFileError(
            f"{label}: column names {duplicates} appear more than once; which one holds the data is ambiguous"
        )
    _check_row_group_extents(parquet, path, size, label)
    return parquet


def _check_row_group_extents(parquet: pq.ParquetFile, path: Path, size: int, label: str) -> None:
    """Every column chunk lies between the leading marker and the footer, and nothing else is there.

    A footer describing bytes it does not cover (a file cut and patched) would
    otherwise be found only when that row group is read; bytes it does not
    describe at all are another file's (two parquet files joined, where the
    reader sees only the second one's rows).
    """
    metadata = parquet.metadata
    footer_start = size - 8 - metadata.serialized_size
    data_end, indexed = len(PARQUET_MAGIC), False
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            end = (start or 0) + chunk.total_compressed_size
            if start is None or start < len(PARQUET_MAGIC) or end > footer_start:
                raise MetaFileError(
                    f"{label}: row group {g}, column '{chunk.path_in_schema}' lies outside the file's data "
                    f"(bytes {start}..{end}, the data ends at {footer_start}): the file is damaged"
                )
            data_end = max(data_end, end)
            indexed = indexed or chunk.has_column_index or chunk.has_offset_index or chunk.bloom_filter_offset
    # Page indexes and bloom filters sit between the data and the footer; without them nothing does.
    joined = data_end != footer_start if not indexed else _contains(path, data_end, footer_start, b"PAR1PAR1")
    if joined:
        raise MetaFileError(
            f"{label}: bytes {data_end}..{footer_start} belong to no row group of the footer: "
            "two parquet files joined into one (only the last one's rows would be read), or a damaged file"
        )


def _contains(path: Path, start: int, end: int, needle: bytes, block: int = 1 << 20) -> bool:
    with path.open("rb") as f:
        f.seek(start)
        tail = b""
        while start < end:
            data = f.read(min(block, end - start))
            if not data:
                return False
            if needle in tail + data:
                return True
            tail, start = data[-len(needle) :], start + len(data)
    return False


def iter_batches(parquet: pq.ParquetFile, label: str, **kwargs: Any) -> Iterator[pa.RecordBatch]:
    """``parquet.iter_batches(**kwargs)``; a row group that cannot be read raises MetaFileError naming it."""
    batches = parquet.iter_batches(**kwargs)
    rows = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise MetaFileError(
                f"{label}: cannot read the rows after row {rows} (a corrupt row group or page): {err}"
            ) from None
        rows += batch.num_rows
        yield batch


def decode_rows(batch: pa.RecordBatch) -> list[dict[str, Any] | UndecodableRow]:
    """The batch's rows as dicts; a row that Python cannot decode is an UndecodableRow instead.

    The common case costs one ``to_pylist``; only a batch that fails is
    decoded again row by row and column by column, to find the bad cells.
    """
    try:
        return batch.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException, ValueError, OverflowError):
        pass
    rows: list[dict[str, Any] | UndecodableRow] = []
    for i in range(batch.num_rows):
        row: dict[str, Any] = {}
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            try:
                row[name] = column[i].as_py()
            except (UnicodeDecodeError, pa.ArrowException, ValueError, OverflowError) as err:
                reason = "invalid UTF-8 in a string" if isinstance(err, UnicodeDecodeError) else type(err).__name__
                rows.append(UndecodableRow(name, f"column '{name}' cannot be decoded: {reason} ({err})"))
                break
        else:
            rows.append(row)
    return rows
