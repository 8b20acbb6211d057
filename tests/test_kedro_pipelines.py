"""Real `kedro run` sessions, in a throwaway copy of the project."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from muco_flow.modeling.backbone import load_backbone
from tests.conftest import kedro_run

pytestmark = pytest.mark.slow  # every test here is a `kedro run` subprocess


def test_default_pipeline_writes_the_sample_and_a_loadable_backbone(project):
    run = kedro_run(
        project, "--params=m3t_mini.train_images=16,m3t_mini.eval_queries_per_dataset=8,m3t_mini.eval_candidates=4"
    )
    # the run ends with its answer (muco_flow.hooks.RunSummary), after Kedro's own last line
    summary = [line.partition("muco_flow.hooks: ")[2] for line in run.stdout.strip().splitlines()[-5:]]
    assert [line.split(": ")[0] for line in summary] == ["score", "registered", "MLflow run", "report", "next"]
    assert summary[1] == "registered: muco-embedder version 1, alias challenger (models:/muco-embedder/1)"
    assert summary[3] == "report: data/08_reporting/evaluation_report.md"

    snapshot = project / "data/01_raw/m3t_mini"
    train = pq.read_table(snapshot / "M3T_train/M3T.parquet")
    assert train.num_rows == 16
    assert all((snapshot / p).is_file() for p in train.column("qry_image_path").to_pylist())
    mmeb = snapshot / "eval/mmeb"
    assert len(list(mmeb.glob("*/*.parquet")) + list(mmeb.glob("*/test/*.parquet"))) == 6  # both HF file layouts

    backbone = load_backbone(str(project / "data/06_models/tiny-qwen2-vl"))
    assert backbone.model.config.text_config.hidden_size == 128


def test_sample_pipeline_alone_and_a_bad_parameter_is_named(project):
    kedro_run(
        project,
        "--pipelines=sample",
        "--params=m3t_mini.train_images=4,m3t_mini.eval_queries_per_dataset=4,m3t_mini.eval_candidates=3",
    )
    assert (project / "data/01_raw/m3t_mini/M3T_train/M3T.parquet").is_file()
    assert not (project / "data/06_models/tiny-qwen2-vl").exists()

    failed = kedro_run(project, "--pipelines=sample", "--params=m3t_mini.train_images=0", check=False)
    assert failed.returncode != 0
    assert "train_images must be at least 1" in failed.stdout + failed.stderr
