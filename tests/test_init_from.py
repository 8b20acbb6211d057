"""training.init_from: stage 1 starts from a model a training stage wrote, and records which one."""

from __future__ import annotations

import hashlib

import pytest

from muco_flow.training.init_model import InitModelError, start_model
from muco_flow.training.model_identity import ModelIdentityError, write_model_identity
from tests.conftest import load_params


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


def test_the_registered_version_of_a_stage_started_from_another_names_that_model(tmp_path, monkeypatch):
    """register's tags for a train_run.json with ``init_from`` (the registration itself is MLflow's, stubbed)."""
    from mlflow.tracking import MlflowClient

    from muco_flow.pipelines.register import nodes

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("muco")).info.run_id
    model = _model_dir(tmp_path)
    identity = write_model_identity(model, mlflow_run_id=run_id, fingerprint="f")
    (tmp_path / "manifest.json").write_text("{}")
    lineage = {"source": "data/06_models/cocoa/model", "run_id": "stage-0-run", "content_hash": "c" * 64}
    train_run = {
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri,
        "model_dir": str(model),
        "model_content_hash": identity["content_hash"],
        "fingerprint": "f",
        "init_from": lineage,
    }
    metrics = {"scored_model": identity | {"mlflow_run_id": run_id}, "headline": {"mmeb_average": 0.5}}
    metrics["delta_vs_baseline"] = {"mmeb_average": 0.1}
    registered = {}
    monkeypatch.setattr(nodes, "register_model_version", lambda uri, **kwargs: registered.update(kwargs))
    monkeypatch.setattr(nodes, "show_eligibility", lambda *args: None)
    registry = load_params()["registry"] | {"primary_metric": "mmeb_average"}
    nodes.register_trained_model(train_run, metrics, str(tmp_path), registry)
    assert {k: v for k, v in registered["tags"].items() if k.startswith("init_from_")} == {
        "init_from_source": "data/06_models/cocoa/model",
        "init_from_run_id": "stage-0-run",
        "init_from_content_hash": "c" * 64,
    }
    # a stage 1 from the backbone has none
    registered.clear()
    nodes.register_trained_model(
        {k: v for k, v in train_run.items() if k != "init_from"}, metrics, str(tmp_path), registry
    )
    assert not any(k.startswith("init_from_") for k in registered["tags"])
