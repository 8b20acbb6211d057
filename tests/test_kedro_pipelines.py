"""Real `kedro run` sessions, in a throwaway copy of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from muco_flow.modeling.backbone import load_backbone
from tests.conftest import PROJECT_ROOT

KEDRO = str(Path(sys.executable).with_name("kedro"))


@pytest.fixture
def project(tmp_path) -> Path:
    """The project's configuration in a fresh directory, with empty data layers."""
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "src").mkdir()  # kedro checks it exists; muco_flow is imported from the install
    shutil.copytree(PROJECT_ROOT / "conf", tmp_path / "conf", ignore=shutil.ignore_patterns("credentials.yml"))
    return tmp_path


def kedro_run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    result = subprocess.run([KEDRO, "run", *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_default_pipeline_writes_the_sample_and_a_loadable_backbone(project):
    kedro_run(
        project, "--params=m3t_mini.train_images=16,m3t_mini.eval_queries_per_dataset=8,m3t_mini.eval_candidates=4"
    )

    snapshot = project / "data/01_raw/m3t_mini"
    train = pq.read_table(snapshot / "M3T_train/M3T.parquet")
    assert train.num_rows == 16
    assert all((snapshot / p).is_file() for p in train.column("qry_image_path").to_pylist())
    assert len(list((snapshot / "eval/mmeb").glob("*/test.parquet"))) == 6

    backbone = load_backbone(str(project / "data/06_models/tiny-qwen2-vl"))
    assert backbone.model.config.text_config.hidden_size == 128


def test_sample_pipeline_alone_and_a_bad_parameter_is_named(project):
    kedro_run(
        project,
        "--pipeline=sample",
        "--params=m3t_mini.train_images=4,m3t_mini.eval_queries_per_dataset=4,m3t_mini.eval_candidates=3",
    )
    assert (project / "data/01_raw/m3t_mini/M3T_train/M3T.parquet").is_file()
    assert not (project / "data/06_models/tiny-qwen2-vl").exists()

    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    failed = subprocess.run(
        [KEDRO, "run", "--pipeline=sample", "--params=m3t_mini.train_images=0"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert failed.returncode != 0
    assert "train_images must be at least 1" in failed.stdout + failed.stderr
