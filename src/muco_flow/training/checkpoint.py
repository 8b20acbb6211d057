"""Atomic, verifiable DeepSpeed checkpoints.

Each checkpoint is an ordinary DeepSpeed checkpoint directory
(``<root>/step-00000040/``, with DeepSpeed's ``latest`` file beside it), written
under a staging name and renamed only once every rank has finished. Its
``complete.json`` lists every file with its size and sha256, so a truncated,
partial or bit-rotted checkpoint is recognised and skipped. It also names the
MLflow run that wrote it, which a resumed training continues.

Checkpoints are pickles; every file is unpickled with ``weights_only=True``
(tensors, containers, numbers and the few DeepSpeed types listed below), so
a tampered checkpoint cannot run code. DeepSpeed's own engine would load
them with ``weights_only=False``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from muco_flow.data.sources import file_sha256

logger = logging.getLogger(__name__)

COMPLETE_FILE = "complete.json"
STAGING_PREFIX = ".staging-"


def checkpoint_tag(step: int) -> str:
    return f"step-{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    engine: Any,
    root: Path,
    step: int,
    *,
    rank: int,
    world_size: int,
    fingerprint: str,
    keep_last: int,
    client_state: dict[str, Any],
    mlflow_run_id: str | None = None,
    keep: Collection[int] = (),
) -> Path:
    """Saves on every rank; returns the final directory. ``mlflow_run_id``: the run a resume continues.

    The ``keep_last`` newest checkpoints stay, and those of the steps in ``keep`` (the best so far, which
    ``training.select: best`` may make the model) beside them.
    """
    root = Path(root)
    tag = checkpoint_tag(step)
    staging = STAGING_PREFIX + tag
    if rank == 0:
        shutil.rmtree(root / staging, ignore_errors=True)  # a leftover of a crash
    _barrier()
    with _disk_full_named(root, tag):
        engine.checkpoint_engine = _checkpoint_engine(engine)
        engine.save_checkpoint(
            str(root), tag=staging, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
        )
        _save_through_python(rng_state(), root / staging / f"rng_state_rank{rank}.pt")
    _barrier()
    if rank == 0:
        files = {
            p.relative_to(root / staging).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted((root / staging).rglob("*"))
            if p.is_file()
        }
        complete = {
            "step": step,
            "world_size": world_size,
            "fingerprint": fingerprint,
            "mlflow_run_id": mlflow_run_id,
            "files": files,
        }
        with _disk_full_named(root, tag):
            (root / staging / COMPLETE_FILE).write_text(json.dumps(complete, indent=1))
        shutil.rmtree(root / tag, ignore_errors=True)
        os.replace(root / staging, root / tag)
        latest = root / ".latest.tmp"
        latest.write_text(tag)
        os.replace(latest, root / "latest")  # DeepSpeed's own pointer, for its tools
        kept = {checkpoint_tag(kept_step) for kept_step in keep}
        for old in sorted(root.glob("step-*"))[:-keep_last]:
            if old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / tag


class CheckpointDiskFullError(OSError):
    """A checkpoint could not be written: the disk holding the checkpoints is full (ENOSPC)."""


@contextmanager
def _disk_full_named(root: Path, tag: str) -> Iterator[None]:
    """Turns ENOSPC inside the block into one error naming the disk's free bytes and the checkpoint's path.

    The message is what the user sees (training's one line on stderr needs no
    disk); without it a full disk showed as torch's "unexpected pos 8000 vs 7892".
    """
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        try:
            free = f"{shutil.disk_usage(root).free} bytes free"
        except OSError:
            free = "free space unknown"
        raise CheckpointDiskFullError(
            errno.ENOSPC,
            f"No space left on device (ENOSPC) writing checkpoint {tag} to {root} ({free}; it failed at "
            f"{err.filename or 'a file of it'}): make room there, lower training.keep_last, or set "
            "training.output_dir to a disk with space; the checkpoints before it are intact",
        ) from err


def _save_through_python(state: Any, path: str | Path) -> None:
    """``torch.save`` through a file Python opened: a failed write raises the OS's error (ENOSPC, EIO) as such.

    Given a path, torch writes with its own file writer and reports any failure
    as "unexpected pos N vs M".
    """
    try:
        with open(path, "wb") as handle:
            torch.save(state, handle)
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err  # a failed write() does not name its file


def verify_checkpoint(directory: Path, fingerprint: str, world_size: int) -> str | None:
    """Why ``directory`` cannot be resumed from, or None if it can."""
    try:
        complete = json.loads((directory / COMPLETE_FILE).read_text())
    except FileNotFoundError:
        return "it has no complete.json (the save did not finish)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its complete.json is corrupt"
    if not isinstance(complete, dict) or not {"files", "world_size", "fingerprint"} <= complete.keys():
        return "its complete.json is corrupt"
    if complete["world_size"] != world_size:
        return f"it was written by {complete['world_size']} processes, this run has {world_size}"
    if complete["fingerprint"] != fingerprint:
        return "it was made with different training settings"
    entries = complete["files"]
    if not isinstance(entries, dict) or not all(
        isinstance(e, dict) and {"bytes", "sha256"} <= e.keys() for e in entries.values()
    ):
        return "its complete.json has no content checksums (an older muco-flow wrote it)"
    for name, entry in entries.items():  # sizes first: cheap, and they name a truncation as such
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written (truncated)"
    for name, entry in entries.items():
        if file_sha256(directory / name) != entry["sha256"]:
            return f"{name} does not match its sha256 (its content changed after it was written)"
    return None


def checkpoint_run_id(directory: Path) -> str | None:
    """The MLflow run that wrote the checkpoint (None if it does not say); call after verify_checkpoint."""
    return json.loads((Path(directory) / COMPLETE_FILE).read_text()).get("mlflow_run_id")


def remove_staging_leftovers(root: Path) -> list[Path]:
    """Removes the staging folders of saves that never finished (killed or out of space); returns them.

    Call it before a training's first save: one training at a time writes to
    ``root`` (see training.lock), so any staging folder then is a leftover.
    """
    leftovers = sorted(Path(root).glob(STAGING_PREFIX + "step-*"))
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
        logger.info("removed %s, left by a save that did not finish", leftover)
    return leftovers


def find_resumable(root: Path, fingerprint: str, world_size: int) -> tuple[str, int] | None:
    """The newest checkpoint that verifies, as (tag, step); warns about each one skipped."""
    for directory in sorted(Path(root).glob("step-*"), reverse=True):
        problem = verify_checkpoint(directory, fingerprint, world_size)
        if problem is None:
            return directory.name, int(directory.name.split("-")[1])
        logger.warning("skipping checkpoint %s: %s", directory, problem)
    return None


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds objects that weights-only unpickling does not allow."""


def deepspeed_checkpoint_types() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The non-tensor types DeepSpeed's ZeRO optimizer files hold (stages 1-3, fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True``, allowing DeepSpeed's checkpoint types and nothing else."""
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds Python objects that weights-only loading does not allow "
            f"({detail or 'see the cause'}); a checkpoint from a source you do not trust can run code"
        ) from err


def _checkpoint_engine(engine: Any) -> Any:
    """The engine's checkpoint engine, made to load with ``weights_only=True`` and to save through Python files
    (``_save_through_python``: a full disk is then ENOSPC)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if getattr(current, "muco_flow_engine", False):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise TypeError(
            f"DeepSpeed uses the checkpoint engine {type(current).__name__}; muco-flow saves and resumes only "
            "through its torch engine, which it makes load with weights_only=True"
        )

    class MuCoCheckpointEngine(TorchCheckpointEngine):
        muco_flow_engine = True

        def load(self, path: str, map_location: Any = None) -> Any:
            return load_weights_only(path, map_location)

        def save(self, state_dict: Any, path: str) -> None:
            _save_through_python(state_dict, path)

    return MuCoCheckpointEngine(engine._config)


def load_checkpoint(engine: Any, root: Path, tag: str, rank: int) -> dict[str, Any]:
    """Restores model, optimizer, scheduler and this rank's RNG; returns the client state.

    Every file is read with ``weights_only=True``: see ``load_weights_only``.
    """
    engine.checkpoint_engine = _checkpoint_engine(engine)
    _, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
    restore_rng_state(load_weights_only(Path(root) / tag / f"rng_state_rank{rank}.pt"))
    return client_state or {}
