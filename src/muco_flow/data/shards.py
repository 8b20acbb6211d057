"""Record shards of at most N rows each, with a sha256 per finished shard.

Parquet (zstd) for what is stored and versioned (ingest); uncompressed Arrow
IPC for what training memory-maps and reads a record at a time (formatted
records), which needs no decoding and keeps nothing of the file in the
process's own memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from muco_flow.data.sources import file_sha256

FILE_FORMATS = {"parquet": ".parquet", "arrow": ".arrow"}


class ShardWriter:
    """Writes rows into ``<directory>/part-NNNNN.<format>`` files of ``rows_per_shard`` rows."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int, file_format: str = "parquet") -> None:
        if file_format not in FILE_FORMATS:
            raise ValueError(f"shard file format must be one of {sorted(FILE_FORMATS)}, got '{file_format}'")
        self.directory, self.schema, self.rows_per_shard = Path(directory), schema, rows_per_shard
        self.file_format = file_format
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []  # file (relative to the parent), rows, sha256
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def _roll(self) -> Any:
        """Finishes the current shard and starts the next; its writer (Parquet or Arrow IPC)."""
        self.close()
        name = f"part-{len(self.shards):05d}{FILE_FORMATS[self.file_format]}"
        self.shards.append({"file": f"{self.directory.name}/{name}", "rows": 0})
        if self.file_format == "arrow":
            writer = pa.ipc.new_file(str(self.directory / name), self.schema)
        else:
            writer = pq.ParquetWriter(self.directory / name, self.schema, compression="zstd", write_page_checksum=True)
        self._writer, self._rows = writer, 0
        return writer

    def write(self, rows: list[dict[str, Any]]) -> None:
        while rows:
            writer = self._writer
            if writer is None or self._rows == self.rows_per_shard:
                writer = self._roll()
            take = rows[: self.rows_per_shard - self._rows]
            rows = rows[len(take) :]
            writer.write_table(pa.Table.from_pylist(take, schema=self.schema))
            self._rows += len(take)
            self.shards[-1]["rows"] += len(take)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.shards[-1]["sha256"] = file_sha256(self.directory.parent / self.shards[-1]["file"])


def read_shard(path: Path) -> pa.Table:
    """A shard file of either format as one table (Arrow IPC memory-mapped, not copied)."""
    path = Path(path)
    if path.suffix == FILE_FORMATS["arrow"]:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return pq.read_table(path)
