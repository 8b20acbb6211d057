"""Tracking outages: a run that logs to an MLflow server that does not answer fails at its start."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from muco_flow.tracking import check_tracking_server, is_locked_store, retry_while_locked
from tests.conftest import kedro_run
from tests.servers import free_port


def dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # a loopback port nothing listens on


def assert_failed_before_loading_anything(result, uri: str, project) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"the MLflow tracking server at {uri} is unreachable" in output
    # only where to log was read: the parameters and the training run's record
    assert set(re.findall(r"Loading data from (\S+)", output)) <= {"params:mlflow", "train_run"}
    assert "Running node" not in output
    assert not (project / "data/06_models/muco").exists()  # no torchrun, no output directory
    assert not (project / "data/08_reporting").exists() or not any((project / "data/08_reporting").iterdir())


@pytest.mark.slow
def test_train_fails_fast_naming_an_unreachable_tracking_server(project):
    # The project has no data at all: failing on the tracking server first shows nothing was loaded before.
    uri = dead_uri()
    began = time.monotonic()
    result = kedro_run(project, "--pipelines=train", env={"MLFLOW_TRACKING_URI": uri}, check=False)
    assert time.monotonic() - began < 120  # Kedro's start-up; the check itself takes milliseconds
    assert_failed_before_loading_anything(result, uri, project)


@pytest.mark.slow
def test_evaluate_fails_fast_when_the_training_runs_server_is_unreachable(project):
    uri = dead_uri()
    (project / "data/06_models").mkdir(parents=True, exist_ok=True)
    (project / "data/06_models/train_run.json").write_text(
        json.dumps({"mlflow_run_id": "0" * 32, "tracking_uri": uri, "model_dir": "data/06_models/muco/model"})
    )
    result = kedro_run(project, "--pipelines=evaluate", check=False)  # mlflow.tracking_uri is the local SQLite store
    assert_failed_before_loading_anything(result, uri, project)


class Health(BaseHTTPRequestHandler):
    status = 200

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"OK" if self.path == "/health" else b"?"
        self.send_response(Health.status if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def health_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    Health.status = 200


def test_a_healthy_server_and_local_stores_pass(health_server):
    check_tracking_server(health_server)
    check_tracking_server(health_server + "/")
    check_tracking_server("sqlite:///mlflow.db")  # no server to ask
    check_tracking_server("file:///tmp/mlruns")


def test_a_server_that_answers_with_an_error_is_unreachable(health_server):
    Health.status = 503
    with pytest.raises(ConnectionError, match=f"server at {health_server} is unreachable \\(HTTPError\\)"):
        check_tracking_server(health_server)


def test_a_server_that_never_answers_fails_within_the_timeout():
    with socket.socket() as listener:  # accepts connections into its backlog, never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        began = time.monotonic()
        with pytest.raises(ConnectionError, match=f"server at {uri} is unreachable \\(ReadTimeout\\)"):
            check_tracking_server(uri, timeout_s=0.5)
        assert time.monotonic() - began < 5


class FlakyClient:
    """A real MLflow client whose first ``failures`` log_batch calls fail, as during a server restart."""

    def __init__(self, client, failures: int) -> None:
        self.client, self.failures, self.calls = client, failures, 0

    def log_batch(self, run_id, metrics):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("tracking server restarting")
        self.client.log_batch(run_id, metrics=metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow SQLite store for the metric tests, an experiment each: a new store's migrations take seconds."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def test_a_tracking_hiccup_during_training_loses_no_metric(store, tmp_path, caplog):
    from muco_flow.tracking import MetricBuffer

    client = store
    run_id = client.create_run(client.create_experiment("hiccup", str(tmp_path / "artifacts"))).info.run_id
    flaky = FlakyClient(client, failures=2)
    buffer = MetricBuffer(flaky, run_id, every=5)
    for step in range(1, 18):
        buffer.log(step, {"loss": 1.0 / step})  # steps 5 and 10 fail to send; 15 sends all of 1-15
    assert buffer.pending == 2 and flaky.calls == 3
    assert sum("MLflow did not take the metrics of step" in r.message for r in caplog.records) == 2
    buffer.flush()
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 18)]

    # the final flush does not swallow a server that is still down
    flaky.failures, flaky.calls = 10, 0
    buffer.log(18, {"loss": 0.1})
    with pytest.raises(ConnectionError):
        buffer.flush()
    assert buffer.pending == 1


def test_a_resumed_run_sends_the_earlier_steps_mlflow_never_got(store, tmp_path):
    from muco_flow.tracking import MetricBuffer

    client = store
    run_id = client.create_run(client.create_experiment("resume", str(tmp_path / "artifacts"))).info.run_id
    buffer = MetricBuffer(client, run_id, every=3, section="batch")
    for step in range(1, 6):
        buffer.log(step, {"loss": 1.0 / step, "grad_norm": 2.0})  # 1-3 sent; 4 and 5 die with the process
    records = [{"step": step, "loss": 1.0 / step, "grad_norm": 2.0} for step in range(1, 6)]  # metrics.jsonl
    assert MetricBuffer(client, run_id, section="batch").log_missing(records) == 2
    assert set(client.get_run(run_id).data.metrics) == {"batch/loss", "batch/grad_norm"}
    for key, value in (("batch/loss", lambda s: 1.0 / s), ("batch/grad_norm", lambda s: 2.0)):
        history = client.get_metric_history(run_id, key)
        assert sorted((m.step, m.value) for m in history) == [(s, value(s)) for s in range(1, 6)]  # no repeats


@pytest.mark.slow
def test_a_copied_project_store_reads_and_writes_its_own_artifacts(tmp_path, monkeypatch):
    """A store made in one folder and copied elsewhere: after relocation every artifact path is the copy's."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from muco_flow.tracking import relocate_project_store

    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    monkeypatch.chdir(original)  # MLflow's default artifact root, ./mlruns, is resolved here
    client = MlflowClient(f"sqlite:///{original / 'mlflow.db'}")
    experiment = client.create_experiment("moved")
    run_id = client.create_run(experiment).info.run_id
    client.log_text(run_id, "logged in the original", "notes/first.txt")
    model = client.create_logged_model(experiment, source_run_id=run_id)
    client.create_registered_model("moved-model")
    client.create_model_version("moved-model", f"models:/{model.model_id}", run_id=run_id, model_id=model.model_id)
    assert client.get_run(run_id).info.artifact_uri.startswith(str(original / "mlruns"))

    shutil.copytree(original, copy)
    assert relocate_project_store("sqlite:///mlflow.db", copy) == str(original / "mlruns")
    assert relocate_project_store("sqlite:///mlflow.db", copy) is None  # nothing left to move

    moved = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    here = str(copy / "mlruns") + "/"
    assert moved.get_experiment(experiment).artifact_location == here + experiment
    run = moved.get_run(run_id)
    assert run.info.artifact_uri == f"{here}{experiment}/{run_id}/artifacts"
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/notes/first.txt") == "logged in the original"
    assert moved.get_logged_model(model.model_id).artifact_location.startswith(here)
    assert moved.get_model_version_download_uri("moved-model", "1").startswith(here)
    # a new process, as the next `kedro run` is (MLflow caches a run's artifact folder per process)
    write = f"import mlflow; mlflow.MlflowClient('sqlite:///mlflow.db').log_text({run_id!r}, 'new', 'notes/second.txt')"
    subprocess.run([sys.executable, "-c", write], cwd=copy, check=True)
    assert (copy / "mlruns" / experiment / run_id / "artifacts/notes/second.txt").is_file()
    assert not (original / "mlruns" / experiment / run_id / "artifacts/notes/second.txt").exists()
    assert client.get_run(run_id).info.artifact_uri.startswith(str(original / "mlruns"))  # the original's store


def test_a_store_whose_artifacts_live_elsewhere_is_left_alone(tmp_path, monkeypatch):
    """No <project>/mlruns/<id> beside the store: its artifact folder was chosen, not left behind by a move."""
    import shutil

    from mlflow.tracking import MlflowClient

    from muco_flow.tracking import relocate_project_store

    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    monkeypatch.chdir(original)
    client = MlflowClient(f"sqlite:///{original / 'mlflow.db'}")
    experiment = client.create_experiment("shared")
    client.log_text(client.create_run(experiment).info.run_id, "x", "x.txt")
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("mlruns"))
    assert relocate_project_store("sqlite:///mlflow.db", copy) is None
    assert MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").get_experiment(experiment).artifact_location == str(
        original / "mlruns" / experiment
    )
    assert relocate_project_store("http://127.0.0.1:5000", copy) is None  # a server keeps its own paths


def locked_sqlite(path) -> sqlite3.Connection:
    """A connection holding ``path``'s write lock, as another writer mid-transaction does (readers still read)."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    return holder


def insert_row(path) -> None:
    """One write that waits for no lock: a locked database fails it at once with "database is locked"."""
    with contextlib.closing(sqlite3.connect(path, timeout=0)) as connection, connection:
        connection.execute("INSERT INTO t VALUES (1)")


def test_a_write_to_a_locked_sqlite_store_is_tried_again_until_the_lock_is_released(tmp_path):
    database = tmp_path / "store.db"
    holder = locked_sqlite(database)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            holder.execute("COMMIT")  # the other writer finishes during the third wait

    retry_while_locked(lambda: insert_row(database), sleep=sleep)
    assert waits == [1.0, 2.0, 4.0]  # doubling from LOCKED_STORE_FIRST_WAIT_S
    assert holder.execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_a_lock_that_stays_fails_after_the_last_attempt_and_other_errors_are_not_retried(tmp_path):
    database = tmp_path / "store.db"
    holder = locked_sqlite(database)
    waits: list[float] = []
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        retry_while_locked(lambda: insert_row(database), sleep=waits.append)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0]  # 6 attempts, 31 s in all
    holder.execute("ROLLBACK")

    def refused() -> None:
        raise ValueError("not a lock")

    with pytest.raises(ValueError, match="not a lock"):
        retry_while_locked(refused, sleep=waits.append)
    assert len(waits) == 5
    # MLflow's SQL store wraps SQLite's error in its own: still recognised through the cause
    from mlflow.exceptions import MlflowException

    locked_sqlite(database)
    with pytest.raises(MlflowException) as wrapped:
        try:
            insert_row(database)
        except sqlite3.OperationalError as err:
            raise MlflowException("(sqlite3.OperationalError) see the cause") from err
    assert is_locked_store(wrapped.value) and not is_locked_store(ValueError("not a lock"))
