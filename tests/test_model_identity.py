"""The model folder names its run and content; evaluate and register refuse any other model or a stale evaluation."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from muco_flow.pipelines.evaluate.nodes import evaluate_trained_model, scored_model
from muco_flow.pipelines.register.nodes import register_trained_model
from muco_flow.training.model_identity import (
    IDENTITY_FILE,
    ModelIdentityError,
    content_hash,
    verify_evaluated_model,
    verify_trained_model,
)
from muco_flow.training.train import _write_final_model
from tests.conftest import load_params

FILES = {"model.safetensors": b"\x01" * 64, "config.json": b"{}", "sub/tokenizer.json": b'{"a": 1}'}


class FakeEmbedder:
    """What _write_final_model needs of the embedder: save_merged writing a directory."""

    def __init__(self, files: dict[str, bytes], fail: bool = False) -> None:
        self.files, self.fail = files, fail

    def save_merged(self, directory: Path, encode_template: str) -> None:
        for name, data in self.files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        if self.fail:
            raise OSError(28, "No space left on device")


def expected_hash(files: dict[str, bytes]) -> str:
    """The content hash computed independently: sorted names, each with its content's sha256."""
    lines = "".join(f"{name}\0{hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def trained(tmp_path, run_id: str = "run-new", files=FILES) -> tuple[Path, dict]:
    target = tmp_path / "muco" / "model"
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_final_model(FakeEmbedder(files), target, "{text}", mlflow_run_id=run_id, fingerprint="f" * 64)
    train_run = {
        "mlflow_run_id": run_id,
        "tracking_uri": "sqlite:///unused.db",
        "model_dir": str(target),
        "model_content_hash": expected_hash(files),
        "fingerprint": "f" * 64,
    }
    return target, train_run


def test_the_final_model_carries_its_run_and_content_hash(tmp_path):
    target, train_run = trained(tmp_path)
    identity = json.loads((target / IDENTITY_FILE).read_text())
    assert identity == {"mlflow_run_id": "run-new", "fingerprint": "f" * 64, "content_hash": expected_hash(FILES)}
    assert content_hash(target) == expected_hash(FILES)
    assert verify_trained_model(target, train_run) == {"mlflow_run_id": "run-new", "content_hash": expected_hash(FILES)}
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no staging or retired folder left


def test_a_failed_write_keeps_the_previous_model_whole(tmp_path):
    target, train_run = trained(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        _write_final_model(FakeEmbedder({"model.safetensors": b"\x02"}, fail=True), target, "{text}",
                           mlflow_run_id="run-other", fingerprint="f" * 64)  # fmt: skip
    verify_trained_model(target, train_run)


def test_a_model_folder_of_another_run_is_refused_by_evaluate_and_register(tmp_path):
    """Rank 0 killed after writing the model, before train_run.json: the folder is newer than the record."""
    target, old_record = trained(tmp_path, run_id="run-old")
    trained(tmp_path, run_id="run-new", files=FILES | {"model.safetensors": b"\x03" * 64})
    message = re.escape(f"{target} holds the model of MLflow run run-new, but train_run.json names run run-old")
    with pytest.raises(ModelIdentityError, match=message):
        evaluate_trained_model({}, old_record, load_params()["evaluate"], {}, {})  # refused before any model is loaded
    metrics = {"scored_model": {"mlflow_run_id": "run-old", "content_hash": old_record["model_content_hash"]}}
    with pytest.raises(ModelIdentityError, match=message):
        register_trained_model(old_record, metrics, str(tmp_path), load_params()["registry"])


def test_changed_files_or_a_record_of_other_content_are_refused(tmp_path):
    target, train_run = trained(tmp_path)
    weights = target / "model.safetensors"
    weights.write_bytes(b"\x01" * 63 + b"\x00")  # same size, one byte changed
    with pytest.raises(ModelIdentityError, match="changed after training wrote them"):
        verify_trained_model(target, train_run)
    weights.write_bytes(FILES["model.safetensors"])
    with pytest.raises(ModelIdentityError, match=re.escape("train_run.json records model content hash 000000000000")):
        verify_trained_model(target, train_run | {"model_content_hash": "0" * 64})
    (target / IDENTITY_FILE).unlink()
    with pytest.raises(ModelIdentityError, match=f"has no {IDENTITY_FILE}"):
        verify_trained_model(target, train_run)


def test_register_refuses_an_evaluation_of_another_model(tmp_path):
    """evaluate killed mid-way leaves the previous metrics.json; a retrain can share the run id, not the hash."""
    target, train_run = trained(tmp_path)
    identity = verify_trained_model(target, train_run)
    stale = {"mlflow_run_id": "run-new", "scored_model": {"mlflow_run_id": "run-new", "content_hash": "e" * 64}}
    stale_message = re.escape("metrics.json scored run run-new, content hash eeeeeeeeeeee")
    with pytest.raises(ModelIdentityError, match=stale_message):
        register_trained_model(train_run, stale, str(tmp_path), load_params()["registry"])
    with pytest.raises(ModelIdentityError, match="no recorded model"):
        verify_evaluated_model({"mlflow_run_id": "run-new"}, identity)
    verify_evaluated_model({"scored_model": identity}, identity)


def test_metrics_record_the_scored_model(tmp_path):
    target, train_run = trained(tmp_path)
    assert scored_model(train_run, None) == {
        "model_dir": str(target),
        "mlflow_run_id": "run-new",
        "content_hash": expected_hash(FILES),
    }
    release = tmp_path / "release"
    release.mkdir()
    (release / "config.json").write_bytes(b"{}")
    assert scored_model(train_run, str(release)) == {
        "model_dir": str(release),
        "mlflow_run_id": None,
        "content_hash": expected_hash({"config.json": b"{}"}),
    }
