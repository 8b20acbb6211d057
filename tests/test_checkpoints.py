"""Which checkpoint a restart resumes from: the newest whole one of the same run, every other one skipped and named."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from muco_flow.training.checkpoint import (
    COMPLETE_FILE,
    CheckpointDiskFullError,
    checkpoint_run_id,
    checkpoint_tag,
    find_resumable,
    remove_staging_leftovers,
    save_checkpoint,
    verify_checkpoint,
)

FINGERPRINT = "a" * 64


def write_checkpoint(root, step: int, *, world_size: int = 2, fingerprint: str = FINGERPRINT, run_id="run-1"):
    """A checkpoint directory as save_checkpoint leaves it: files, then complete.json with their sizes and sha256."""
    directory = root / checkpoint_tag(step)
    directory.mkdir(parents=True)
    contents = {"mp_rank_00_model_states.pt": bytes(300), "zero_pp_rank_0_mp_rank_00_optim_states.pt": bytes(500)}
    files = {}
    for name, data in contents.items():
        (directory / name).write_bytes(data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    complete = {
        "step": step, "world_size": world_size, "fingerprint": fingerprint, "mlflow_run_id": run_id, "files": files,
    }  # fmt: skip
    (directory / COMPLETE_FILE).write_text(json.dumps(complete))
    return directory


def damage_truncate(directory) -> str:
    victim = directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    return "zero_pp_rank_0_mp_rank_00_optim_states.pt has 100 bytes, 500 were written (truncated)"


def damage_bit_rot(directory) -> str:
    victim = directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[200:264] = b"\xff" * 64  # 64 bytes overwritten, the size unchanged
    victim.write_bytes(bytes(data))
    return (
        "zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its sha256 (its content changed after it was written)"
    )


def damage_no_checksums(directory) -> str:
    complete = json.loads((directory / COMPLETE_FILE).read_text())
    complete["files"] = {name: entry["bytes"] for name, entry in complete["files"].items()}  # the earlier format
    (directory / COMPLETE_FILE).write_text(json.dumps(complete))
    return "its complete.json has no content checksums (an older muco-flow wrote it)"


def damage_remove_file(directory) -> str:
    (directory / "mp_rank_00_model_states.pt").unlink()
    return "mp_rank_00_model_states.pt is missing"


def damage_unfinished(directory) -> str:
    (directory / COMPLETE_FILE).unlink()  # a save killed before its end
    return "it has no complete.json (the save did not finish)"


def damage_corrupt_manifest(directory) -> str:
    (directory / COMPLETE_FILE).write_text('{"step": 4, "files": {')
    return "its complete.json is corrupt"


def damage_manifest_without_keys(directory) -> str:
    (directory / COMPLETE_FILE).write_text('{"step": 4}')
    return "its complete.json is corrupt"


@pytest.mark.parametrize(
    "damage",
    [
        damage_truncate,
        damage_bit_rot,
        damage_no_checksums,
        damage_remove_file,
        damage_unfinished,
        damage_corrupt_manifest,
        damage_manifest_without_keys,
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_for_the_one_before(tmp_path, caplog, damage):
    write_checkpoint(tmp_path, 4)
    reason = damage(write_checkpoint(tmp_path, 8))
    with caplog.at_level(logging.WARNING, logger="muco_flow.training.checkpoint"):
        assert find_resumable(tmp_path, FINGERPRINT, world_size=2) == (checkpoint_tag(4), 4)
    assert [r.getMessage() for r in caplog.records] == [f"skipping checkpoint {tmp_path / 'step-00000008'}: {reason}"]


def test_checkpoints_of_other_settings_or_another_world_size_are_not_resumed(tmp_path):
    other_settings = write_checkpoint(tmp_path, 4, fingerprint="b" * 64)
    other_world = write_checkpoint(tmp_path, 8, world_size=4)
    assert verify_checkpoint(other_settings, FINGERPRINT, 2) == "it was made with different training settings"
    assert verify_checkpoint(other_world, FINGERPRINT, 2) == "it was written by 4 processes, this run has 2"
    assert find_resumable(tmp_path, FINGERPRINT, world_size=2) is None


def test_staging_leftovers_of_a_killed_save_are_never_candidates(tmp_path):
    write_checkpoint(tmp_path, 4)
    (tmp_path / ".staging-step-00000008").mkdir()  # what a kill during a save leaves
    assert find_resumable(tmp_path, FINGERPRINT, world_size=2) == (checkpoint_tag(4), 4)
    assert find_resumable(tmp_path / "none-yet", FINGERPRINT, world_size=2) is None


def test_staging_leftovers_of_killed_saves_are_removed_before_a_run_saves(tmp_path):
    kept = write_checkpoint(tmp_path, 4)
    for step in (8, 12):
        (tmp_path / f".staging-step-{step:08d}").mkdir()
        (tmp_path / f".staging-step-{step:08d}" / "mp_rank_00_model_states.pt").write_bytes(bytes(10))
    assert [p.name for p in remove_staging_leftovers(tmp_path)] == [".staging-step-00000008", ".staging-step-00000012"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]
    assert remove_staging_leftovers(tmp_path / "none-yet") == []


def test_a_checkpoint_names_the_mlflow_run_that_wrote_it(tmp_path):
    assert checkpoint_run_id(write_checkpoint(tmp_path, 4, run_id="abc123")) == "abc123"


class FullDiskEngine:
    """A DeepSpeed engine as save_checkpoint sees it, whose model file lands on a full disk (/dev/full: ENOSPC)."""

    def __init__(self) -> None:
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        self._config = None
        self.checkpoint_engine = TorchCheckpointEngine(None)

    def save_checkpoint(self, save_dir: str, tag: str, **options) -> None:
        target = Path(save_dir) / tag / "mp_rank_00_model_states.pt"
        target.parent.mkdir(parents=True)
        target.symlink_to("/dev/full")
        self.checkpoint_engine.save({"module": torch.zeros(4096)}, str(target))  # as DeepSpeed saves each file


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_named_with_its_free_bytes_not_as_torchs_unexpected_pos(tmp_path):
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointDiskFullError) as raised:
        save_checkpoint(FullDiskEngine(), root, 8, rank=0, world_size=1, fingerprint=FINGERPRINT, keep_last=2,
                        client_state={"step": 8})  # fmt: skip
    error = raised.value
    assert error.errno == errno.ENOSPC
    assert str(error).startswith(
        f"[Errno 28] No space left on device (ENOSPC) writing checkpoint step-00000008 to {root} ("
    )
    assert re.search(r"\(\d+ bytes free; it failed at \S+mp_rank_00_model_states\.pt\)", str(error))
    assert "unexpected pos" not in str(error)
    assert not (root / "step-00000008").exists()  # never renamed into place: the checkpoints before it stay the newest
