"""Rank 0's MLflow run of a training (training/run_tracking.py) against a real SQLite tracking store."""

from __future__ import annotations

import json
import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient, is_tracking_uri_set

from muco_flow.training.run_tracking import (
    ERROR_TAG,
    PREDECESSOR_TAG,
    STOPPED_TAG,
    TrainingRun,
    ended_as_failed_on_error,
)


@pytest.fixture
def config(tmp_path):
    """The parts of a run config (launch.py's resolve_run_config) that tracking reads."""
    # TrainingRun.start sets the process-wide tracking URI (and exports MLFLOW_TRACKING_URI): both are put back
    previous_uri = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    (tmp_path / "shards").mkdir()
    yield {
        "stage": "train",
        "fingerprint": "f" * 64,
        "checkpoint": "backbone",
        "shards_dir": str(tmp_path / "shards"),
        "training": {"log_every": 2, "learning_rate": 0.001},
        "backbone": {"dtype": "float32"},
        "deepspeed": {"zero_optimization": {"stage": 2}},
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment": "runs",
            "run_name": "a-run",
            "description": "a test run",
            "tags": {"kedro.pipeline": "train"},
            "data_fingerprint": "d" * 64,
        },
    }
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous_uri)
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported


def run_steps(run: TrainingRun, steps: range) -> None:
    for step in steps:
        run.log(step, {"loss": 1.0 / step, "learning_rate": 0.001})  # the loss curve plots both


def test_a_run_from_step_0_logs_every_step_and_finishes(config, tmp_path):
    client = MlflowClient(config["mlflow"]["tracking_uri"])
    run = TrainingRun.start(config, tmp_path, start_step=0, checkpoint_run=None)
    run_steps(run, range(1, 6))
    run.finish()

    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "a-run"
    assert logged.data.params["training.learning_rate"] == "0.001" and logged.data.params["checkpoint"] == "backbone"
    assert logged.data.tags["muco_flow.stage"] == "train" and logged.data.tags["kedro.pipeline"] == "train"
    history = client.get_metric_history(run.run_id, "batch/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 6)]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert json.loads((tmp_path / "run.json").read_text())["mlflow_run_id"] == run.run_id
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "plots")}
    assert artifacts == {"plots/loss_curve.png"}


def test_a_resumed_run_continues_and_a_new_start_ends_the_unfinished_one(config, tmp_path):
    client = MlflowClient(config["mlflow"]["tracking_uri"])
    first = TrainingRun.start(config, tmp_path, start_step=0, checkpoint_run=None)
    run_steps(first, range(1, 6))  # steps 1-4 reach MLflow (every 2 steps), then the process is killed
    mlflow.end_run(status="RUNNING")  # what a killed process leaves behind: the run stays RUNNING

    resumed = TrainingRun.start(config, tmp_path, start_step=3, checkpoint_run=None)  # run.json's run
    assert resumed.run_id == first.run_id
    # metrics.jsonl is cut back to the checkpoint's step, so that step 4 and 5 are not there twice
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    mlflow.end_run(status="RUNNING")

    restarted = TrainingRun.start(config, tmp_path, start_step=0, checkpoint_run=None)
    assert restarted.run_id != first.run_id
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_an_error_ends_the_run_failed_with_its_steps_and_the_error(config, tmp_path):
    client = MlflowClient(config["mlflow"]["tracking_uri"])
    run = TrainingRun.start(config, tmp_path, start_step=0, checkpoint_run=None)
    with pytest.raises(FloatingPointError), ended_as_failed_on_error(run):
        run_steps(run, range(1, 4))  # step 3 is still buffered when the error comes
        raise FloatingPointError("loss is nan")
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert logged.data.tags[ERROR_TAG] == "FloatingPointError: loss is nan"
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "batch/loss")) == [1, 2, 3]


def test_a_rank_without_a_run_passes_the_error_on():
    with pytest.raises(KeyboardInterrupt), ended_as_failed_on_error(None):
        raise KeyboardInterrupt


def test_a_preempted_run_ends_killed_with_its_step_and_a_resume_logs_no_step_twice(config, tmp_path):
    client = MlflowClient(config["mlflow"]["tracking_uri"])
    first = TrainingRun.start(config, tmp_path, start_step=0, checkpoint_run=None)
    run_steps(first, range(1, 6))  # every 2 steps to MLflow: 1-4 sent, 5 buffered
    first.end_preempted(5, "SIGTERM")
    stopped = client.get_run(first.run_id)
    assert stopped.info.status == "KILLED"
    assert {k: stopped.data.tags[k] for k in (STOPPED_TAG, "muco_flow.stopped_at_step", "muco_flow.stopped_by")} == {
        STOPPED_TAG: "preempted",
        "muco_flow.stopped_at_step": "5",
        "muco_flow.stopped_by": "SIGTERM",
    }
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "batch/loss")) == [1, 2, 3, 4, 5]

    # resumed from an older checkpoint (step 3): steps 4 and 5 are trained again and must not reach MLflow twice
    resumed = TrainingRun.start(config, tmp_path, start_step=3, checkpoint_run=first.run_id)
    assert resumed.run_id == first.run_id
    run_steps(resumed, range(4, 9))
    resumed.finish()
    finished = client.get_run(first.run_id)
    assert finished.info.status == "FINISHED" and STOPPED_TAG not in finished.data.tags
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "batch/loss")) == list(range(1, 9))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))


def test_a_resume_whose_run_is_gone_continues_in_a_new_run_naming_it(config, tmp_path):
    first = TrainingRun.start(config, tmp_path, start_step=0, checkpoint_run=None)
    run_steps(first, range(1, 5))
    first.end_preempted(4, "SIGTERM")
    # the project moves without its mlflow.db: a new, empty store
    config["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'moved.db'}"
    client = MlflowClient(config["mlflow"]["tracking_uri"])

    resumed = TrainingRun.start(config, tmp_path, start_step=4, checkpoint_run=first.run_id)
    assert resumed.run_id != first.run_id
    new_run = client.get_run(resumed.run_id)
    assert new_run.data.tags[PREDECESSOR_TAG] == first.run_id and new_run.info.status == "RUNNING"
    # the new run has the whole curve: the steps before the checkpoint come from metrics.jsonl
    assert sorted(m.step for m in client.get_metric_history(resumed.run_id, "batch/loss")) == [1, 2, 3, 4]
    run_steps(resumed, range(5, 7))
    resumed.end_preempted(6, "SIGUSR1")

    # the checkpoint of step 4 still names the gone run: the next resume continues the new one, not a third
    again = TrainingRun.start(config, tmp_path, start_step=4, checkpoint_run=first.run_id)
    assert again.run_id == resumed.run_id
    run_steps(again, range(5, 9))
    again.finish()
    assert sorted(m.step for m in client.get_metric_history(resumed.run_id, "batch/loss")) == list(range(1, 9))
    assert len(client.search_runs([new_run.info.experiment_id])) == 1
