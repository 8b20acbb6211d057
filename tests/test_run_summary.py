"""The lines a run ends with: read from what its nodes wrote, only for what the run made."""

from __future__ import annotations

import json
import logging

from kedro.io import DataCatalog
from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.hooks import RunSummary, run_page, run_summary

METRICS = {
    "model": {"mmeb": {"average": 0.482}, "mbeir": {"average": {"local": 0.453, "global": 0.2}}},
    "baseline": {"mmeb": {"average": 0.159}, "mbeir": {"average": {"local": 0.125, "global": 0.05}}},
    "mlflow_run_id": "abc123",
}
REGISTRATION = {
    "name": "muco-embedder",
    "version": 3,
    "run_id": "abc123",
    "model_uri": "models:/muco-embedder/3",
    "alias": "challenger",
}


def test_the_summary_states_score_version_run_report_and_next_commands():
    assert run_summary(METRICS, REGISTRATION, report="data/08_reporting/evaluation_report.md") == [
        "score: MMEB-format average hit@1 0.482 trained vs 0.159 untrained (3.03x); "
        "M-BEIR R@5 local 0.453 vs 0.125, global 0.200 vs 0.050",
        "registered: muco-embedder version 3, alias challenger (models:/muco-embedder/3)",
        "MLflow run: abc123",
        "report: data/08_reporting/evaluation_report.md",
        "next: kedro run --pipelines=promote (champion if it beats the champion by the margin); "
        "serve: mlflow models serve -m models:/muco-embedder@challenger --env-manager local -p 5001",
    ]


def test_an_evaluation_alone_says_to_register_and_a_zero_baseline_gives_no_ratio():
    metrics = {"model": {"mmeb": {"average": 0.25}}, "baseline": {"mmeb": {"average": 0.0}}, "mlflow_run_id": "r1"}
    assert run_summary(metrics, None, report="r.md", run_url="http://mlflow:5000/#/experiments/2/runs/r1") == [
        "score: MMEB-format average hit@1 0.250 trained vs 0.000 untrained",
        "MLflow run: r1 (http://mlflow:5000/#/experiments/2/runs/r1)",
        "report: r.md",
        "next: kedro run --pipelines=register, then promote",
    ]
    assert run_summary(None, None) == []


def test_a_local_store_has_no_run_page():
    assert run_page("sqlite:///mlflow.db", "abc123") is None
    assert run_page("http://127.0.0.1:5000", None) is None


def catalog_of(tmp_path) -> DataCatalog:
    for prefix, version in (("", 1), ("finetune/", 2)):
        (tmp_path / prefix).mkdir(exist_ok=True)
        (tmp_path / f"{prefix}metrics.json").write_text(json.dumps(METRICS))
        (tmp_path / f"{prefix}registration.json").write_text(json.dumps(REGISTRATION | {"version": version}))
    (tmp_path / "train_run.json").write_text(json.dumps({"tracking_uri": "sqlite:///mlflow.db"}))
    config = {"train_run": {"type": "json.JSONDataset", "filepath": str(tmp_path / "train_run.json")}}
    for prefix, folder in (("", ""), ("finetune.", "finetune/")):
        config[f"{prefix}evaluation_metrics"] = {
            "type": "json.JSONDataset",
            "filepath": str(tmp_path / f"{folder}metrics.json"),
        }
        config[f"{prefix}registration"] = {
            "type": "json.JSONDataset",
            "filepath": str(tmp_path / f"{folder}registration.json"),
        }
        config[f"{prefix}evaluation_report"] = {
            "type": "text.TextDataset",
            "filepath": str(tmp_path / f"{folder}report.md"),
        }
    return DataCatalog.from_config(config)


def summary_of(pipeline, tmp_path, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="muco_flow.hooks"):
        RunSummary().after_pipeline_run({}, {}, pipeline, catalog_of(tmp_path))
    return [r.getMessage() for r in caplog.records if r.name == "muco_flow.hooks"]


def test_the_hook_logs_only_what_the_run_made(tmp_path, caplog):
    def made(*inputs):
        return None

    register = Pipeline([node(made, "train_run", "registration", name="register")])
    lines = summary_of(register, tmp_path, caplog)
    assert [line.split(":")[0] for line in lines] == ["registered", "MLflow run", "next"]
    assert lines[0] == "registered: muco-embedder version 1, alias challenger (models:/muco-embedder/3)"

    evaluate = Pipeline([node(made, "train_run", ["evaluation_metrics", "evaluation_report"], name="evaluate")])
    lines = summary_of(evaluate, tmp_path, caplog)
    assert lines[0].startswith("score: MMEB-format average hit@1 0.482 trained vs 0.159 untrained (3.03x)")
    assert lines[2] == f"report: {tmp_path / 'report.md'}"  # outside the working directory: as the catalog has it

    finetune = pipeline(  # the finetune pipeline's namespace
        [node(made, "train_run", ["evaluation_metrics", "registration"], name="finetune")],
        inputs={"train_run"},
        namespace="finetune",
    )
    lines = summary_of(finetune, tmp_path, caplog)
    assert [line.split(":")[0] for line in lines] == [
        "stage 2 score",
        "stage 2 registered",
        "stage 2 MLflow run",
        "stage 2 next",
    ]
    assert "version 2," in lines[1]  # the stage-2 record, not stage 1's

    sample = Pipeline([node(made, "train_run", "ingest_report", name="ingest")])
    assert summary_of(sample, tmp_path, caplog) == []
