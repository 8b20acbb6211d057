"""One training at a time per output folder.

Two trainings writing one folder share run_config.json, run.json, the
checkpoints and the MLflow run: both would train with the second one's
settings. ``output_folder_lock`` holds ``<output_dir>/train.lock`` for the
whole run: an exclusive ``flock`` on it (the kernel releases it when the
holder dies, however it dies) and, inside it, who holds it (pid@host and
start time) for the message a second training gets.

A lock file naming a process on this host that no longer runs is taken over
(the flock says it is free). One naming another host is refused even when the
flock is free: a network filesystem may not carry flocks between hosts, and
whether that process still runs cannot be seen from here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


def lock_file_name(node_rank: int = 0) -> str:
    """Node 0's lock is ``train.lock``; on several nodes each other node's launcher holds its own.

    Every node of one training runs a launcher against the shared output
    folder; a second training conflicts with the first on node 0 (and on any
    node rank both use).
    """
    return LOCK_FILE if node_rank == 0 else f"train.node{node_rank}.lock"


class TrainingLockedError(RuntimeError):
    """Another training holds the output folder."""


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')}@{holder.get('host')} (started {holder.get('started')})"


def _read_holder(handle) -> dict:
    handle.seek(0)
    text = handle.read()
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        holder = {"pid": "?", "host": "?", "started": f"unreadable lock file: {text[:80]!r}"}
    return holder if isinstance(holder, dict) else {}


@contextmanager
def output_folder_lock(output_dir: str | Path, name: str = LOCK_FILE) -> Iterator[dict]:
    """Holds the training lock ``name`` of ``output_dir`` inside the block; yields the holder record written to it."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    with open(path, "a+") as handle:  # never truncated before the flock is held
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingLockedError(
                f"{output_dir} is in use by another training: {_describe(_read_holder(handle))}, as {path} says. "
                "Wait for it to finish, or train into another training.output_dir"
            ) from None
        previous = _read_holder(handle)
        if previous and previous.get("host") != host:
            raise TrainingLockedError(
                f"{path} names a training on another host: {_describe(previous)}. If it no longer runs, "
                f"remove {path}; otherwise wait for it, or train into another training.output_dir"
            )
        if previous:
            logger.warning("taking over %s from %s, which no longer runs", path, _describe(previous))
        holder = {"pid": os.getpid(), "host": host, "started": datetime.now(UTC).isoformat(timespec="seconds")}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        try:
            yield holder
        finally:
            handle.seek(0)
            handle.truncate()  # an empty lock file is a free one; removing it would race with the next opener
            handle.flush()
