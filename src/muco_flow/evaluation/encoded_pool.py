"""Candidate pools as scoring reads them: whole blocks in pool order, or a few given rows.

``InMemoryPool`` holds vectors already encoded. ``EncodedPool`` is for pools
too large for memory (M-BEIR's global pool: 5.6M candidates, ~6 KB each at
d=1536 in fp32): it encodes ``block_rows`` items at a time, each block to its
own ``.npy`` file under a key naming what the vectors depend on (the model,
how it encodes, the items) and only then made visible (written aside,
fsynced, renamed), so a killed evaluation resumes at the first missing block
and a re-run encodes nothing. Scoring reads either kind through the same two
methods (``blocks``, ``rows``), so memory is bounded by one block, not by the
pool, and a pool on disk scores exactly as the same vectors in memory.
``PrefixPool`` reads another pool's vectors cut to their first ``dim``
coordinates (Matryoshka prefixes): the same vectors, never encoded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muco_flow.modeling.matryoshka import nested_prefix

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_ROWS = 65536


def _check_block_rows(block_rows: int) -> None:
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"evaluate.pool_block_rows must be an integer of at least 1, got {block_rows!r}")


class InMemoryPool:
    """Vectors already in memory, read as ``block_rows``-row blocks."""

    def __init__(self, vectors: torch.Tensor, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        _check_block_rows(block_rows)
        self.vectors, self.block_rows = vectors, block_rows

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def blocks(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), self.block_rows):
            yield self.vectors[start : start + self.block_rows]

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        return self.vectors[list(indices)]


class EncodedPool:
    """``items`` encoded by ``encode`` into ``directory/<key>/block-NNNNN.npy`` files of ``block_rows`` rows.

    The key is a digest of ``key_parts`` (what the vectors depend on besides
    the items: the model and how it encodes), ``block_rows`` and
    ``item_key`` of every item; anything that changes a vector must be in it,
    since a pool with the same key is read back without encoding.
    """

    def __init__(
        self,
        directory: str | Path,
        items: Sequence[Any],
        encode: Callable[[Sequence[Any]], torch.Tensor],
        *,
        key_parts: Iterable[str],
        block_rows: int = DEFAULT_BLOCK_ROWS,
        item_key: Callable[[Any], str] = repr,
    ) -> None:
        _check_block_rows(block_rows)
        digest = hashlib.sha256()
        for part in [*key_parts, f"block_rows={block_rows}"]:
            digest.update(part.encode() + b"\0")
        for item in items:
            digest.update(item_key(item).encode() + b"\0")
        self.directory = Path(directory) / digest.hexdigest()[:32]
        self.items, self.encode, self.block_rows = items, encode, block_rows
        self._complete = False
        self._layouts: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def block_count(self) -> int:
        return -(-len(self.items) // self.block_rows)

    def _path(self, block: int) -> Path:
        return self.directory / f"block-{block:05d}.npy"

    def missing_blocks(self) -> list[int]:
        return [b for b in range(self.block_count) if not self._path(b).exists()]

    def ensure(self, rank: int = 0, ranks: int = 1) -> None:
        """Encodes and writes every block not on disk yet; blocks already there are kept.

        With ``ranks`` > 1, only this rank's share: blocks ``rank``,
        ``rank + ranks``, ... (each written whole, so ranks never collide).
        """
        if self._complete:
            return
        missing = [block for block in self.missing_blocks() if block % ranks == rank]
        if missing:
            logger.info(
                "rank %d of %d: encoding %d of %d blocks (%d items) into %s",
                rank, ranks, len(missing), self.block_count, len(self.items), self.directory,
            )  # fmt: skip
            self.directory.mkdir(parents=True, exist_ok=True)
        for block in missing:
            rows = self.items[block * self.block_rows : (block + 1) * self.block_rows]
            vectors = self.encode(rows)
            if vectors.ndim != 2 or vectors.shape[0] != len(rows) or vectors.dtype != torch.float32:
                raise ValueError(
                    f"the encoder gave {tuple(vectors.shape)} {vectors.dtype} vectors for {len(rows)} items "
                    "(one float32 vector per item expected)"
                )
            path = self._path(block)
            staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(staging, "wb") as out:
                np.save(out, vectors.cpu().numpy())
                out.flush()
                os.fsync(out.fileno())
            os.replace(staging, path)  # a block is either whole or absent
        self._complete = ranks == 1

    def blocks(self) -> Iterator[torch.Tensor]:
        """The pool's vectors, one block at a time, in item order."""
        self.ensure()
        for block in range(self.block_count):
            yield torch.from_numpy(np.load(self._path(block)))

    def _layout(self, block: int) -> tuple[int, int]:
        """Where a block file's rows start, and their width (read from its .npy header once)."""
        if block not in self._layouts:
            path = self._path(block)
            with open(path, "rb") as file:
                version = np.lib.format.read_magic(file)
                if version == (1, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
                else:
                    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
                if len(shape) != 2 or fortran_order or dtype != np.dtype("<f4"):
                    raise ValueError(f"{path} is not a pool block (2-D little-endian float32 rows)")
                self._layouts[block] = (file.tell(), shape[1])
        return self._layouts[block]

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        """The vectors of pool rows ``indices``, in that order.

        Each row is read on its own (``pread``): mapping the files instead
        would leave their pages in the process's memory, up to the whole pool.
        """
        self.ensure()
        index = np.asarray(list(indices), dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"pool rows {index.min()}..{index.max()} asked of a pool of {len(self)}")
        width = self._layout(0)[1] if self.block_count else 0
        out = np.empty((index.size, width), dtype=np.float32)
        blocks, offsets = np.divmod(index, self.block_rows)
        for block in np.unique(blocks):
            start, _ = self._layout(int(block))
            with open(self._path(int(block)), "rb") as file:
                for position in np.flatnonzero(blocks == block):
                    row = os.pread(file.fileno(), width * 4, start + int(offsets[position]) * width * 4)
                    out[position] = np.frombuffer(row, dtype=np.float32)
        return torch.from_numpy(out)


class PrefixPool:
    """Another pool's vectors, each cut to its first ``dim`` coordinates and re-normalised, as they are read."""

    def __init__(self, pool: InMemoryPool | EncodedPool, dim: int) -> None:
        self.pool, self.dim = pool, dim

    def __len__(self) -> int:
        return len(self.pool)

    def blocks(self) -> Iterator[torch.Tensor]:
        for block in self.pool.blocks():
            yield nested_prefix(block, self.dim)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        return nested_prefix(self.pool.rows(indices), self.dim)


VectorPool = InMemoryPool | EncodedPool | PrefixPool
