"""Faults around a training run, checked without starting one (the end-to-end cases are in test_training.py)."""

from __future__ import annotations

import errno
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from muco_flow.training.config import TrainingConfig
from muco_flow.training.data import StaleConversationsError, check_conversations_match_shards
from muco_flow.training.launch import ERROR_MARKER, failure_message, resolve_run_config
from muco_flow.training.lock import LOCK_FILE, TrainingLockedError, lock_file_name, output_folder_lock
from muco_flow.training.stage import run_training_stage
from muco_flow.training.train import NonFiniteLossError, check_finite
from tests.conftest import PROJECT_ROOT, load_params


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_or_gradient_norm_stops_training_naming_the_step(value):
    with pytest.raises(NonFiniteLossError, match=f"training stopped at step 7: the loss is {value}; no checkpoint"):
        check_finite(7, "loss", value)
    with pytest.raises(NonFiniteLossError, match=f"step 3: the gradient norm is {value}"):
        check_finite(3, "gradient norm", value)


def test_finite_values_pass():
    for value in (0.0, 1e30, -2.5):
        check_finite(1, "loss", value)


def hold_lock_in_child(output_dir: Path, ready, release) -> None:
    with output_folder_lock(output_dir):
        ready.set()
        release.wait(60)


@pytest.mark.slow  # a spawned process holds the lock
def test_a_second_training_into_the_same_folder_is_refused_naming_the_holder(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    child = context.Process(target=hold_lock_in_child, args=(tmp_path, ready, release))
    child.start()
    try:
        assert ready.wait(60)
        holder = f"pid {child.pid}@{socket.gethostname()}"
        message = re.escape(f"{tmp_path} is in use by another training: {holder}")
        with pytest.raises(TrainingLockedError, match=message), output_folder_lock(tmp_path):
            pass
    finally:
        release.set()
        child.join(60)
    with output_folder_lock(tmp_path) as holder:  # free again once the holder is done
        assert holder["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""


@pytest.mark.slow  # a finished python process gives a dead pid
def test_the_lock_of_a_dead_training_on_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))  # what a SIGKILLed training leaves
    with caplog.at_level(logging.WARNING, logger="muco_flow.training.lock"), output_folder_lock(tmp_path) as holder:
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == holder
    assert f"from pid {stale['pid']}@{stale['host']} (started 2026-01-01T00:00:00+00:00), which no longer runs" in (
        caplog.text
    )


def test_a_lock_naming_another_host_is_refused_with_how_to_free_it(tmp_path):
    other = {"pid": 4242, "host": "node-17", "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    message = r"names a training on another host: pid 4242@node-17 .* remove"
    with pytest.raises(TrainingLockedError, match=message), output_folder_lock(tmp_path):
        pass


def write_manifests(root: Path, ingested: list[str], formatted: list[str] | None) -> tuple[Path, Path]:
    """An ingest manifest (shards with sha256) and a format manifest recording the shards it read."""
    shards, conversations = root / "m3t_shards", root / "m3t_conversations"
    shards.mkdir()
    conversations.mkdir()
    entries = [{"file": f"shards/part-{i:05d}.parquet", "rows": 10, "sha256": h} for i, h in enumerate(ingested)]
    (shards / "manifest.json").write_text(json.dumps({"shards": entries}))
    record = {} if formatted is None else {"ingest_manifest_shards": formatted}
    (conversations / "manifest.json").write_text(json.dumps({"shards": [], **record}))
    return conversations, shards


def test_conversations_formatted_from_the_shards_in_place_are_accepted(tmp_path):
    check_conversations_match_shards(*write_manifests(tmp_path, ["a" * 64, "b" * 64], ["a" * 64, "b" * 64]))


@pytest.mark.parametrize(
    ("formatted", "recorded"),
    [(["a" * 64, "c" * 64], "2 shards"), (["a" * 64], "1 shards"), (None, "no record of its shards")],
)
def test_conversations_of_other_shards_stop_training_before_it_starts(tmp_path, formatted, recorded):
    """A data run killed during format: new shards beside the previous snapshot's conversations."""
    conversations, shards = write_manifests(tmp_path, ["a" * 64, "b" * 64], formatted)
    message = re.escape(
        f"the conversations in {conversations} were formatted from other shards ({recorded}) than the 2 in {shards} "
        "now: re-run `kedro run --pipelines=format`"
    )
    with pytest.raises(StaleConversationsError, match=message):
        # the node refuses first: no tracking server, backbone or process is touched
        run_training_stage(str(conversations), str(shards), "no-checkpoint", {}, {}, {}, {}, {})


def run_fingerprint(project: Path) -> str:
    """resolve_run_config for a project laid out under ``project``, every path absolute (as a moved copy has them)."""
    training = load_params()["training"]
    training["output_dir"] = str(project / "data/06_models/muco")
    training["deepspeed"]["config"] = str(project / "conf/zero2.json")
    return resolve_run_config(
        training=TrainingConfig.from_dict(training),
        backbone=load_params()["backbone"],
        encode_template="{text}<|emb|>",
        tracking_uri="sqlite:///mlflow.db",
        experiment="muco",
        checkpoint=str(project / "backbone"),
        conversations_dir=str(project / "conversations"),
        shards_dir=str(project / "shards"),
    )["fingerprint"]


def test_the_fingerprint_hashes_contents_so_a_moved_project_resumes(tmp_path):
    original = tmp_path / "original"
    for name, data in {"backbone/config.json": b'{"a": 1}', "backbone/model.safetensors": b"\x01" * 32,
                       "conversations/manifest.json": b'{"shards": []}'}.items():  # fmt: skip
        (original / name).parent.mkdir(parents=True, exist_ok=True)
        (original / name).write_bytes(data)
    (original / "conf").mkdir()
    shutil.copy(PROJECT_ROOT / "conf/base/deepspeed/zero2.json", original / "conf/zero2.json")
    before = run_fingerprint(original)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    original.rename(moved)
    assert run_fingerprint(moved) == before
    (moved / "backbone/model.safetensors").write_bytes(b"\x01" * 31 + b"\x02")  # other weights: not resumable
    assert run_fingerprint(moved) != before


def test_a_full_disk_reaches_the_error_message_though_the_error_file_cannot_be_written(tmp_path, monkeypatch, capfd):
    """ENOSPC in a checkpoint save: the rank's error file ends up empty, the cause still reaches Kedro."""
    import muco_flow.training.train as rank_process

    out = tmp_path / "out"
    config_path = tmp_path / "run_config.json"
    config_path.write_text(json.dumps({"output_dir": str(out)}))
    staging = out / "checkpoints/.staging-step-00000004/mp_rank_00_model_states.pt"

    def full_disk(config):
        raise OSError(errno.ENOSPC, "No space left on device", str(staging))

    write_text = Path.write_text

    def write_on_a_full_disk(self, *args, **kwargs):
        if self.suffix == ".error":
            write_text(self, "")  # the file is created, its content finds no room
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(rank_process, "train", full_disk)
    monkeypatch.setattr(Path, "write_text", write_on_a_full_disk)
    monkeypatch.setattr(sys, "argv", ["train", str(config_path)])
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(OSError, match="No space left on device"):
        rank_process.main()
    monkeypatch.undo()
    causes = [line for line in capfd.readouterr().err.splitlines() if ERROR_MARKER in line]
    error_file = out / "logs/rank1.error"
    assert causes == [
        f"muco-flow training error (rank 1): OSError: [Errno 28] No space left on device: '{staging}'",
        f"muco-flow training error (rank 1): could not write {error_file}: [Errno 28] No space left on device",
    ]
    assert error_file.read_text() == ""
    torchrun_output = [f"torchrun line {i}\n" for i in range(60)]
    message = failure_message(out / "logs", 1, causes, torchrun_output)
    assert message.splitlines()[:3] == [f"training failed (exit 1); see {out / 'logs'}", *causes]
    assert "last output:" in message and "torchrun line 59" in message  # the empty error file is passed over


def test_the_error_files_tracebacks_follow_the_causes(tmp_path):
    (tmp_path / "rank0.error").write_text("Traceback (most recent call last):\nValueError: bad batch\n")
    (tmp_path / "rank1.error").write_text("")
    cause = "muco-flow training error (rank 0): ValueError: bad batch"
    message = failure_message(tmp_path, 1, [cause], ["noise\n"])
    assert message == (
        f"training failed (exit 1); see {tmp_path}\n{cause}\n"
        "--- rank0 ---\nTraceback (most recent call last):\nValueError: bad batch\n"
    )


def test_each_node_of_a_multi_node_training_holds_its_own_lock(tmp_path):
    """Every node's launcher locks the shared output folder: node 0 and node 1 of one training do not conflict."""
    assert [lock_file_name(r) for r in (0, 1, 3)] == ["train.lock", "train.node1.lock", "train.node3.lock"]
    with output_folder_lock(tmp_path, lock_file_name(0)), output_folder_lock(tmp_path, lock_file_name(1)):
        assert json.loads((tmp_path / "train.node1.lock").read_text())["pid"] == os.getpid()
