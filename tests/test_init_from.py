"""training.init_from: stage 1 starts from a model a training stage wrote, and records which one."""

from __future__ import annotations

import hashlib

import pytest

from muco_flow.training.init_model import InitModelError
from muco_flow.training.model_identity import ModelIdentityError, write_model_identity
from muco_flow.training.stage import start_model


def _model_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"abc")
    return model


def test_a_stage_model_is_started_from_with_its_run_and_content_hash(tmp_path):
    model = _model_dir(tmp_path)
    write_model_identity(model, mlflow_run_id="run-0", fingerprint="f")
    # the content hash by hand: sorted relative paths, each with its file's sha256
    expected = hashlib.sha256()
    for name, data in (("config.json", b"{}"), ("weights.bin", b"abc")):
        expected.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    directory, lineage = start_model(str(model), "http://unused", tmp_path / "download")
    assert directory == str(model)
    assert lineage == {"source": str(model), "run_id": "run-0", "content_hash": expected.hexdigest()}


def test_a_model_changed_after_training_or_not_written_by_one_is_refused(tmp_path):
    model = _model_dir(tmp_path)
    with pytest.raises(ModelIdentityError, match=r"no model_identity\.json"):
        start_model(str(model), "http://unused", tmp_path / "download")
    write_model_identity(model, mlflow_run_id="run-0", fingerprint="f")
    (model / "weights.bin").write_bytes(b"abd")
    with pytest.raises(ModelIdentityError, match="changed after training"):
        start_model(str(model), "http://unused", tmp_path / "download")


def test_a_directory_that_is_no_model_is_named_by_the_setting(tmp_path):
    with pytest.raises(InitModelError, match=r"^training\.init_from .* is not a model directory"):
        start_model(str(tmp_path), "http://unused", tmp_path / "download")
