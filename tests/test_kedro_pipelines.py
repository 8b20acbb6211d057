"""Real `kedro run` sessions, in a throwaway copy of the project."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

from muco_flow.modeling.backbone import load_backbone
from tests.conftest import KEDRO, kedro_run, new_project

pytestmark = pytest.mark.slow  # every test here is a `kedro run` subprocess

SMALL_DEFAULT_RUN = "--params=m3t_mini.train_images=16,m3t_mini.eval_queries_per_dataset=8,m3t_mini.eval_candidates=4"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The default pipeline, small, under Kedro's default (sequential) runner: its project and its output."""
    project = new_project(tmp_path_factory.mktemp("default") / "project")
    return project, kedro_run(project, SMALL_DEFAULT_RUN)


def test_default_pipeline_writes_the_sample_and_a_loadable_backbone(default_run):
    project, run = default_run
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


# What differs between two runs of the same code and data: the MLflow run id (and the records that carry it, or a
# hash of one that does), the hash of the run's parameters (the runner is one) and the measured speeds. Everything
# else a run writes must be the same.
RUN_RECORDS = {"complete.json", "run.json", "run_config.json", "model_identity.json", "train_run.json"}
VOLATILE_KEYS = {"mlflow_run_id", "run_id", "params_hash", "pairs_per_second", "tokens_per_second"}


def without_volatile(record):
    if isinstance(record, dict):
        return {key: without_volatile(value) for key, value in record.items() if key not in VOLATILE_KEYS}
    return record


def comparable_outputs(project: Path) -> dict[str, object]:
    """Every file the run wrote under data/: its sha256, or for a record with a run id or a speed, the rest of it."""
    outputs: dict[str, object] = {}
    for path in sorted((project / "data").rglob("*")):
        name = str(path.relative_to(project))
        if not path.is_file() or path.name in RUN_RECORDS or path.suffix == ".log":  # logs carry times
            continue
        if path.suffix == ".csv" and "loss" in path.name:
            outputs[name] = [without_volatile(row) for row in csv.DictReader(path.open())]
        elif path.suffix == ".jsonl":
            outputs[name] = [without_volatile(json.loads(line)) for line in path.open()]
        elif path.name in {"metrics.json", "registration.json"}:
            outputs[name] = without_volatile(json.loads(path.read_text()))
        else:
            outputs[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return outputs


@pytest.mark.parametrize("runner", ["ThreadRunner", "ParallelRunner"])
def test_other_runners_write_what_the_sequential_runner_writes(default_run, tmp_path, runner):
    # Every hand-off between pipelines is a dataset one node writes and the next reads, so a runner that runs
    # independent nodes at once (threads, processes) still runs each node after its inputs (issue: the sample
    # and ingestion used to run side by side under ThreadRunner, and ingestion found no snapshot)
    sequential, _ = default_run
    project = new_project(tmp_path / "project")
    run = kedro_run(project, f"--runner={runner}", SMALL_DEFAULT_RUN)
    assert "registered: muco-embedder version 1, alias challenger" in run.stdout.strip().splitlines()[-4]
    expected, written = comparable_outputs(sequential), comparable_outputs(project)
    assert "data/06_models/muco/model/model.safetensors" in written  # the trained weights, byte for byte
    assert sorted(written) == sorted(expected)
    assert [name for name in expected if written[name] != expected[name]] == []


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


def test_kedro_viz_draws_the_default_run_as_its_stages(project):
    """Headless Chromium on `kedro viz run`: each stage is a namespace, collapsed to one box, in data order."""
    from tests.servers import ARTIFACTS, background_server, free_port, headless_chromium

    url = f"http://127.0.0.1:{free_port(highest=49151)}"  # kedro-viz refuses ports above 49151
    command = [KEDRO, "viz", "run", "--no-browser", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
    server = background_server(
        command, f"{url}/api/main", timeout_s=120, env={"KEDRO_DISABLE_TELEMETRY": "true"}, log=project / "viz.log"
    )
    with server, headless_chromium() as page:
        graph = requests.get(f"{url}/api/main", timeout=30).json()
        page.goto(url, wait_until="domcontentloaded")
        page.locator("g.pipeline-node").first.wait_for(timeout=60_000)
        page.wait_for_timeout(2000)  # the layout settles after the first nodes draw
        boxes = [text.strip() for text in page.locator("g.pipeline-node").all_text_contents()]
        page.screenshot(path=str(ARTIFACTS / "kedro_viz_stages.png"))
    stages = {"sample", "backbone", "ingest", "format", "train", "evaluate", "register"}
    assert stages <= set(boxes), boxes
    # the hand-offs, as edges: sample -> m3t_source -> ingest -> m3t_shards -> format -> ... -> register
    names = {node["id"]: node["name"] for node in graph["nodes"]}
    edges = {(names[edge["source"]], names[edge["target"]]) for edge in graph["edges"]}
    chain = ["sample", "m3t_source", "ingest", "m3t_shards", "format", "m3t_conversations", "train", "train_run",
             "evaluate", "evaluation_metrics", "register"]  # fmt: skip
    assert [pair for pair in itertools.pairwise(chain) if pair not in edges] == []
