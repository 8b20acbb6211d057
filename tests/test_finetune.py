"""`kedro run --pipelines=finetune`: MuCo's stage 2 from a stage-1 run, evaluated and registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL_RUN_PARAMS, kedro_run, new_project
from tests.test_training import train_params

FINETUNE_STEPS = 3
FOUR_WAY_TERMS = ["query_target", "query_target_aux", "query_aux_target", "query_aux_target_aux"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_finetune_starts_from_the_stage1_run_logs_the_four_way_terms_and_registers_both_runs(tmp_path):
    project = new_project(tmp_path / "project")
    kedro_run(project, "--pipelines=sample", f"--params={SMALL_RUN_PARAMS}")
    kedro_run(project, "--pipelines=backbone")
    kedro_run(project, "--pipelines=data")
    kedro_run(project, "--pipelines=train", train_params("data/06_models/muco", **{"training.max_steps": 2}))
    kedro_run(project, "--pipelines=finetune_data")
    kedro_run(
        project,
        "--pipelines=finetune",
        f"--params=finetune.training.max_steps={FINETUNE_STEPS},finetune.training.micro_batch_size=4,"
        "finetune.training.warmup_steps=1",
    )

    stage1 = json.loads((project / "data/06_models/train_run.json").read_text())
    stage2 = json.loads((project / "data/06_models/finetune_run.json").read_text())
    assert stage2["parent_run_id"] == stage1["mlflow_run_id"] != stage2["mlflow_run_id"]
    assert stage2["steps"] == FINETUNE_STEPS
    assert stage2["model_dir"] == "data/06_models/muco_finetune/model"
    assert (project / stage2["model_dir"] / "muco_embedder.json").is_file()
    # the run started from the stage-1 model, not from the backbone
    run_config = json.loads((project / "data/06_models/muco_finetune/run_config.json").read_text())
    assert run_config["checkpoint"] == stage1["model_dir"] and run_config["stage"] == "finetune"

    lines = (project / "data/06_models/muco_finetune/metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics] == list(range(1, FINETUNE_STEPS + 1))
    for m in metrics:
        terms = [m[f"loss/{name}"] for name in FOUR_WAY_TERMS]
        assert m["loss"] == pytest.approx(sum(terms), rel=1e-5)  # the total is the four terms' sum

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(stage2["mlflow_run_id"])
    assert run.data.tags["muco_flow.parent_run_id"] == stage1["mlflow_run_id"]
    assert run.data.tags["muco_flow.stage"] == "finetune"
    assert stage1["mlflow_run_id"] in run.data.tags["mlflow.note.content"]
    assert set(FOUR_WAY_TERMS) <= {key.removeprefix("batch/loss/") for key in run.data.metrics}
    # evaluate logged the fine-tuned model's metrics into its own run
    assert run.data.tags["muco_flow.evaluated"] == "true"

    registration = json.loads((project / "data/08_reporting/finetune/registration.json").read_text())
    version = client.get_model_version("muco-embedder", str(registration["version"]))
    assert version.run_id == stage2["mlflow_run_id"]
    assert version.tags["parent_run_id"] == stage1["mlflow_run_id"]
    assert len(version.tags) <= 9  # stage 1's lineage (7), parent_run_id, promotion.eligible
    assert stage1["mlflow_run_id"] in version.description and stage2["mlflow_run_id"] in version.description

    # a registered version is a starting point too (finetune.init_from=models:/...): its model directory, unchanged
    from muco_flow.training.init_model import resolve_init_model

    uri = f"sqlite:///{project / 'mlflow.db'}"
    directory, parent = resolve_init_model(f"models:/muco-embedder/{version.version}", stage1, uri, tmp_path / "init")
    assert parent == stage2["mlflow_run_id"]
    registered = sorted(path for path in (project / stage2["model_dir"]).iterdir() if path.is_file())
    assert registered and all((Path(directory) / path.name).read_bytes() == path.read_bytes() for path in registered)
