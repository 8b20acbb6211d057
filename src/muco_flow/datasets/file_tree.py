"""A Kedro dataset for a directory of files: an M3T snapshot, shards, a model.

Nodes return either ``{relative path: bytes}`` (small trees, built in memory)
or a writer, a callable that fills a given directory (large trees streamed
to disk, such as ingestion's shards). This dataset owns where and how the
tree lands. Loading returns the directory's path, because what reads it
(pyarrow, ``from_pretrained``) wants a path.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset, DatasetError


def _safe_relative(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DatasetError(f"FileTreeDataset: refusing to write '{name}': paths must be relative, inside the root")
    return path


TreeWriter = Callable[[Path], object]


def _owned_name(root: Path, kind: str) -> Path:
    """A sibling of ``root`` named for the process that writes it: ``.<name>.<kind>-<pid>@<host>-<random>``."""
    return root.with_name(f".{root.name}.{kind}-{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_siblings(root: Path) -> list[Path]:
    """Removes the staging and retired trees of ``root`` left by writers that died (killed runs).

    A tree is stale when the process its name records ran on this host and is
    gone; trees of live processes, or of other hosts sharing the filesystem,
    are left alone. Returns what was removed.
    """
    pattern = re.compile(rf"^\.{re.escape(root.name)}\.(?:tmp|old)-(\d+)@(.+)-[0-9a-f]{{8}}$")
    removed = []
    for candidate in root.parent.glob(f".{root.name}.*-*"):
        match = pattern.match(candidate.name)
        if match and match.group(2) == socket.gethostname() and not _alive(int(match.group(1))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


class FileTreeDataset(AbstractDataset[dict[str, bytes] | TreeWriter, str]):
    """Saves a tree under ``path``, replacing what was there.

    The new tree is written beside the old one and swapped in by renames, so
    a crash mid-write leaves the previous complete tree, never a mix.
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._root = Path(path)
        self.metadata = metadata

    def load(self) -> str:
        if not self._root.is_dir():
            raise DatasetError(f"FileTreeDataset: '{self._root}' does not exist; run the pipeline that writes it first")
        return str(self._root)

    def save(self, data: dict[str, bytes] | TreeWriter) -> None:
        if not data:
            raise DatasetError(f"FileTreeDataset: refusing to replace '{self._root}' with an empty tree")
        self._root.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(self._root)
        staging = _owned_name(self._root, "tmp")
        try:
            if callable(data):
                staging.mkdir()
                data(staging)
            else:
                for name, content in data.items():
                    target = staging / _safe_relative(name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
            retired = _owned_name(self._root, "old")
            if self._root.exists():
                self._root.rename(retired)
            staging.rename(self._root)
            shutil.rmtree(retired, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _exists(self) -> bool:
        return self._root.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._root)}
