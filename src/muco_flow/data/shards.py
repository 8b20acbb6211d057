"""Parquet shards of at most N rows each, with a sha256 per finished shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from muco_flow.data.sources import file_sha256


class ShardWriter:
    """Writes rows into ``<directory>/part-NNNNN.parquet`` files of ``rows_per_shard`` rows."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int) -> None:
        self.directory, self.schema, self.rows_per_shard = Path(directory), schema, rows_per_shard
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []  # file (relative to the parent), rows, sha256
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def _roll(self) -> None:
        self.close()
        name = f"part-{len(self.shards):05d}.parquet"
        self.shards.append({"file": f"{self.directory.name}/{name}", "rows": 0})
        self._writer = pq.ParquetWriter(
            self.directory / name, self.schema, compression="zstd", write_page_checksum=True
        )
        self._rows = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        while rows:
            if self._writer is None or self._rows == self.rows_per_shard:
                self._roll()
            take = rows[: self.rows_per_shard - self._rows]
            rows = rows[len(take) :]
            self._writer.write_table(pa.Table.from_pylist(take, schema=self.schema))
            self._rows += len(take)
            self.shards[-1]["rows"] += len(take)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.shards[-1]["sha256"] = file_sha256(self.directory.parent / self.shards[-1]["file"])
