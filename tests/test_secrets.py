"""Secrets: S3 credentials never reach logs, MLflow, data outputs or git."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from muco_flow.data import schema
from tests.conftest import PROJECT_ROOT, SMALL_RUN_PARAMS, kedro_run, new_project
from tests.s3_server import Fault, faulty_proxy, moto_server, s3_client_for, upload_tree

pytestmark = pytest.mark.slow

# Recognisable, and new on every run: no file can hold them unless this run put them there.
SECRET = f"MUCO-TEST-SECRET-{uuid.uuid4().hex}"
KEY_ID = f"AKIAMUCOTEST{uuid.uuid4().hex[:8].upper()}"
NO_AWS_ENV = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": "", "AWS_SESSION_TOKEN": ""}
CREDENTIALS = "conf/local/credentials.yml"


def files_holding(root: Path, needles: list[str], skip: set[Path] = frozenset()) -> list[str]:
    """Every file under ``root`` whose bytes contain one of ``needles``."""
    encoded = [n.encode() for n in needles]
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path not in skip and any(n in path.read_bytes() for n in encoded):
            found.append(str(path.relative_to(root)))
    return found


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A git-tracked project that ingests from S3 with credentials in conf/local, then trains with them in the env.

    Returns the project and the output of every run: a clean one with S3
    retries, a training run, and a run that fails on a missing object.
    """
    project = new_project(tmp_path_factory.mktemp("secrets") / "project")
    shutil.copy(PROJECT_ROOT / ".gitignore", project)
    git(project, "init", "-q")
    kedro_run(project, "--pipelines=sample", f"--params={SMALL_RUN_PARAMS}")
    kedro_run(project, "--pipelines=backbone")
    outputs = []
    with moto_server() as endpoint, faulty_proxy(endpoint) as proxy:
        upload_tree(s3_client_for(endpoint), project / "data/01_raw/m3t_mini", "m3t-private", "v1")
        (project / CREDENTIALS).write_text(
            "m3t_s3:\n"
            f"  aws_access_key_id: {KEY_ID}\n"
            f"  aws_secret_access_key: {SECRET}\n"
            "  region_name: us-east-1\n"
            f"  endpoint_url: {proxy.endpoint}\n"
        )
        # transient faults, so that the retry path logs too
        proxy.inject(f"v1/{schema.TRAIN_META_FILE}", Fault("status", 503))
        proxy.inject("images/train/000003.png", Fault("reset"))
        source = "--params=m3t_source_uri=s3://m3t-private/v1"
        ingest = kedro_run(project, "--pipelines=data", source, env=NO_AWS_ENV)
        assert "attempt 2 of 5" in ingest.stdout + ingest.stderr
        assert proxy.gets("images/train/000003.png") == 2
        outputs.append(ingest)
        missing = kedro_run(
            project, "--pipelines=ingest", "--params=m3t_source_uri=s3://m3t-private/v2", env=NO_AWS_ENV, check=False
        )
        assert missing.returncode != 0
        assert "s3://m3t-private/v2/M3T_train/M3T.parquet: NoSuchKey" in missing.stdout + missing.stderr
        outputs.append(missing)
    # training with the secret in its environment, as on a machine where AWS_* is set
    train = "--params=" + ",".join(
        f"training.{k}={v}" for k, v in {"max_steps": 4, "save_every": 2, "micro_batch_size": 4}.items()
    )
    aws_env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    outputs.append(kedro_run(project, "--pipelines=train", train, env=aws_env))
    return project, [o.stdout + o.stderr for o in outputs]


def test_the_scan_finds_a_secret_where_there_is_one(runs):
    project, _ = runs
    assert files_holding(project, [SECRET]) == [CREDENTIALS]  # the one place it belongs


def test_logs_never_hold_the_credentials(runs):
    project, outputs = runs
    for output in outputs:
        assert SECRET not in output and KEY_ID not in output
    logs = [p for p in project.rglob("*") if p.suffix in (".log", ".stdout", ".error") or p.name == "info.log"]
    assert any(p.parent.name == "logs" for p in logs)  # the training ranks' logs are among them
    for log in logs:
        text = log.read_text(errors="replace")
        assert SECRET not in text and KEY_ID not in text, log


def test_mlflow_params_tags_and_artifacts_never_hold_the_credentials(runs, tmp_path):
    project, _ = runs
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs_seen = 0
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            runs_seen += 1
            for values in (run.data.params, run.data.tags):
                text = " ".join(f"{k}={v}" for k, v in values.items())
                assert SECRET not in text and KEY_ID not in text
            local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
            assert any(local.rglob("*.json")), "the run's artifacts were downloaded"
            assert files_holding(local, [SECRET, KEY_ID]) == []
    assert runs_seen >= 1
    # ...and the store itself, byte for byte
    assert SECRET.encode() not in (project / "mlflow.db").read_bytes()


def test_data_outputs_and_every_other_file_never_hold_the_credentials(runs):
    project, _ = runs
    assert files_holding(project, [SECRET, KEY_ID], skip={project / CREDENTIALS}) == []


def test_git_never_gets_the_credentials(runs):
    project, _ = runs
    assert git(project, "check-ignore", "-q", CREDENTIALS, check=False).returncode == 0
    git(project, "add", "-A")
    tracked = git(project, "ls-files").stdout.splitlines()
    assert "conf/base/catalog.yml" in tracked and CREDENTIALS not in tracked
    for needle in (SECRET, KEY_ID):
        assert git(project, "grep", "--cached", "-F", "-q", needle, check=False).returncode == 1
    # the repository itself: what is tracked, and what is not ignored
    assert git(PROJECT_ROOT, "check-ignore", "-q", CREDENTIALS, check=False).returncode == 0
    for needle in (SECRET, KEY_ID):
        assert git(PROJECT_ROOT, "grep", "--untracked", "-F", "-q", needle, check=False).returncode == 1
