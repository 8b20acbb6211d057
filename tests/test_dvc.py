"""DVC: dvc.yaml against the pipelines its stages run; `dvc repro` in a clone; M3T snapshots on a real S3 server.

The first tests read dvc.yaml (through DVC, so `${...}` is resolved) and
compare each stage with what its Kedro pipeline really reads and writes: the
modules it imports, its `params:` inputs, its catalog entries. The slow ones
clone this repository's HEAD, shrink the sample and the training run, and
drive the real `dvc` and `kedro` commands.
"""

from __future__ import annotations

import ast
import csv
import functools
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from muco_flow.datasets import FileTreeDataset
from muco_flow.pipelines.finetune.nodes import finetuning_settings
from muco_flow.training.config import laid_over
from tests.conftest import PROJECT_ROOT, SMALL_RUN_PARAMS, config_loader, kedro_run, new_project
from tests.s3_server import ACCESS_KEY, SECRET_KEY, moto_server, s3_client_for, s3_env, upload_tree

CHAIN = [
    "sample",
    "backbone",
    "ingest",
    "format",
    "finetune_data",
    "pretrain_cocoa",
    "train",
    "evaluate",
    "register",
    "mine",
    "finetune",
]
BIN = Path(sys.executable).parent
SRC = PROJECT_ROOT / "src"


# --- dvc.yaml as DVC resolves it ------------------------------------------------------------


@dataclass
class StageSpec:
    cmd: str
    deps: list[str]
    params: dict[str, set[str]]  # parameter file -> tracked keys
    outs: dict[str, Any]  # path -> the DVC output (metric/plot flags, plot properties)


@functools.cache
def dvc_stages() -> dict[str, StageSpec]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    stages = {}
    with Repo(str(PROJECT_ROOT)) as repo:
        for stage in repo.index.stages:
            if not stage.name:  # a .dvc file, not a dvc.yaml stage
                continue
            params = {d.def_path: set(d.params) for d in stage.deps if isinstance(d, ParamsDependency)}
            deps = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
            stages[stage.name] = StageSpec(stage.cmd, deps, params, {o.def_path: o for o in stage.outs})
    return stages


def kedro_pipeline(stage: str):
    match = re.fullmatch(r"kedro run --pipelines=(\w+)", dvc_stages()[stage].cmd)
    assert match, f"stage {stage} runs {dvc_stages()[stage].cmd!r}, not one Kedro pipeline"
    return importlib.import_module(f"muco_flow.pipelines.{match.group(1)}").create_pipeline()


def catalog_path(entry: dict[str, Any]) -> str | None:
    return next((entry[key] for key in ("filepath", "path", "uri") if key in entry), None)


def covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


# --- the code a stage runs ----------------------------------------------------------------


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def referenced_modules(path: Path) -> set[str]:
    """muco_flow modules that ``path`` imports, or names as a string (a `python -m` target)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative imports are not followed here"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return {n for n in names if n.startswith("muco_flow.") and module_file(n)}


def code_used_by(stage: str) -> set[str]:
    """Non-empty source files reachable from the stage's pipeline and the datasets it touches."""
    catalog = config_loader()["catalog"]
    todo = [f"muco_flow.pipelines.{stage}"]
    for dataset in kedro_pipeline(stage).datasets():
        module, _, cls = catalog.get(dataset, {}).get("type", "").rpartition(".")
        if module.startswith("muco_flow"):
            todo.append(getattr(importlib.import_module(module), cls).__module__)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(referenced_modules(module_file(name)))
    files = {module_file(name) for name in seen}
    return {f.relative_to(PROJECT_ROOT).as_posix() for f in files if f.read_text().strip()}


def parameter_values(stage: str) -> dict[str, Any]:
    params = config_loader()["parameters"]
    values = {}
    for name in kedro_pipeline(stage).inputs():
        if name.startswith("params:"):
            value = params
            for part in name.removeprefix("params:").split("."):
                value = value[part]
            values[name.removeprefix("params:")] = value
    if "finetune" in values:  # fine-tuning runs the `training` settings with `finetune.training` laid over them
        values["training"] = finetuning_settings(values["training"], values["finetune"].get("training") or {})
    if "cocoa" in values:  # CoCoA's stage 0 likewise, with `cocoa.training`
        values["training"] = laid_over(values["training"], values["cocoa"].get("training") or {}, "cocoa.training")
    return values


def strings_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


def test_the_chain_runs_one_kedro_pipeline_per_stage():
    assert [name for name in dvc_stages() if name in CHAIN] == CHAIN
    for name in CHAIN:
        assert dvc_stages()[name].cmd == f"kedro run --pipelines={name}"
        assert kedro_pipeline(name).nodes


@pytest.mark.parametrize("stage", CHAIN)
def test_stage_deps_are_the_code_it_imports(stage):
    used = code_used_by(stage)
    code_deps = [d for d in dvc_stages()[stage].deps if d.startswith("src/")]
    untracked = sorted(f for f in used if not any(covers(d, f) for d in code_deps))
    needless = sorted(d for d in code_deps if not any(covers(d, f) for f in used))
    assert (untracked, needless) == ([], []), f"{stage}: untracked {untracked}, not imported {needless}"


@pytest.mark.parametrize("stage", CHAIN)
def test_stage_deps_include_the_configuration_files_its_parameters_name(stage):
    named = {s for s in strings_in(parameter_values(stage)) if s.startswith("conf/") and (PROJECT_ROOT / s).is_file()}
    assert {d for d in dvc_stages()[stage].deps if d.startswith("conf/")} == named
    if stage == "train":
        assert named == {"conf/base/deepspeed/zero2.json"}


@pytest.mark.parametrize("stage", CHAIN)
def test_stage_params_are_the_parameters_its_nodes_read(stage):
    expected: dict[str, set[str]] = {}
    for key in parameter_values(stage):
        top = key.split(".")[0]
        files = [
            p
            for p in sorted((PROJECT_ROOT / "conf/base").glob("parameters*.yml"))
            if top in yaml.safe_load(p.read_text())
        ]
        assert len(files) == 1, f"{top} is defined in {files}"
        expected.setdefault(files[0].relative_to(PROJECT_ROOT).as_posix(), set()).add(key)
    # catalog entries of the pipeline that use ${globals:...} (the snapshot URI)
    raw_catalog = yaml.safe_load((PROJECT_ROOT / "conf/base/catalog.yml").read_text())
    for dataset in kedro_pipeline(stage).datasets():
        for name in re.findall(r"\$\{globals:([\w.]+)", json.dumps(raw_catalog.get(dataset, {}))):
            expected.setdefault("conf/base/globals.yml", set()).add(name)
    assert dvc_stages()[stage].params == expected


@pytest.mark.parametrize("stage", CHAIN)
def test_stage_outs_are_what_its_nodes_write(stage):
    catalog = config_loader()["catalog"]
    pipeline = kedro_pipeline(stage)
    expected = {catalog_path(catalog[d]) for d in pipeline.all_outputs() if d in catalog and catalog_path(catalog[d])}
    # a directory the node writes itself (training.output_dir)
    expected |= {s for s in strings_in(parameter_values(stage)) if s.startswith("data/")}
    assert set(dvc_stages()[stage].outs) == expected


@pytest.mark.parametrize("stage", CHAIN)
def test_stage_data_deps_are_its_inputs_written_by_earlier_stages(stage):
    catalog = config_loader()["catalog"]
    inputs = {catalog_path(catalog[d]) for d in kedro_pipeline(stage).inputs() if d in catalog}
    data_deps = {d for d in dvc_stages()[stage].deps if d.startswith("data/")}
    assert inputs <= data_deps
    earlier = [out for name in CHAIN[: CHAIN.index(stage)] for out in dvc_stages()[name].outs]
    assert all(any(covers(out, dep) for out in earlier) for dep in data_deps), data_deps


def test_metrics_are_the_compact_headline_and_plots_are_static_images():
    evaluate, train = dvc_stages()["evaluate"].outs, dvc_stages()["train"].outs
    outs = {**train, **evaluate}
    assert [p for p, out in outs.items() if out.metric] == ["data/08_reporting/headline_metrics.json"]
    assert "data/08_reporting/metrics.json" in evaluate  # the full results stay an output
    # images only: `dvc plots show` draws Vega plots with a library it loads from a CDN, blank offline
    plots = sorted(p for p, out in outs.items() if out.plot)
    assert plots == [f"data/08_reporting/{n}" for n in ("mmeb_hit_at_1.png", "recall_at_k.png", "train_loss.png")]


# --- the real commands in a clone ----------------------------------------------------------------

TOOL_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "KEDRO_DISABLE_TELEMETRY": "true",
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `kedro` in the stages' commands
    "GIT_AUTHOR_NAME": "muco-flow tests",
    "GIT_AUTHOR_EMAIL": "tests@muco-flow.invalid",
    "GIT_COMMITTER_NAME": "muco-flow tests",
    "GIT_COMMITTER_EMAIL": "tests@muco-flow.invalid",
}


def run(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=cwd, env={**os.environ, **TOOL_ENV, **(env or {})}, capture_output=True, text=True, timeout=1500
    )
    if check:
        assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def dvc(cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(cwd, str(BIN / "dvc"), *args, **kwargs)


def git(cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(cwd, "git", *args, **kwargs)


def sample_evaluation_results(evaluate: dict[str, Any]) -> dict[str, Any]:
    """Results shaped as evaluating the bundled sample gives them (its MMEB sets, M-BEIR tasks and pools), with
    full-precision values: what `headline()` and `select_headline_metrics` see after `make run`."""
    values = (i / 7 % 1 for i in range(1, 10_000))  # in [0, 1), 1/7 first
    mmeb_sets = {name: d for name, d in evaluate["mmeb"]["datasets"].items() if name.startswith("MiniShapes")}
    mbeir = evaluate["mbeir"]
    ks = mbeir["recall_ks"]["default"]
    return {
        "mmeb": {
            "average": next(values),
            "meta_tasks": {d["meta_task"]: next(values) for d in mmeb_sets.values()},
            "datasets": {name: {"hit@1": next(values)} for name in mmeb_sets},
        },
        "mbeir": {
            "average": {kind: next(values) for kind in mbeir["pools"]},
            "rows": {
                kind: {task: {f"recall@{k}": next(values) for k in ks} | {"queries": 8} for task in mbeir["tasks"]}
                for kind in mbeir["pools"]
            },
        },
        "m3t_heldout": {"turn0": {"recall@1": next(values)}},
    }


STAGE1_PLOTS = ("train_loss.png", "recall_at_k.png", "mmeb_hit_at_1.png")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dvc_metrics_show_prints_the_sample_headline_within_200_columns(tmp_path):
    """The real `dvc metrics show` over headline_metrics.json as the evaluate node writes it for the sample; after
    a default run (stage 1 only) neither it nor `dvc plots show` reports a file it failed to load."""
    from muco_flow.evaluation.report import compare
    from muco_flow.pipelines.evaluate.nodes import select_headline_metrics

    evaluate = config_loader()["parameters"]["evaluate"]
    results = sample_evaluation_results(evaluate)
    headline = select_headline_metrics(compare(results, results, chance=0.25), evaluate)
    assert "mmeb/average" in headline and any(key.startswith("mbeir/") for key in headline), headline

    shutil.copy(PROJECT_ROOT / "dvc.yaml", tmp_path)
    shutil.copytree(PROJECT_ROOT / "conf", tmp_path / "conf")  # dvc.yaml's `vars`
    dvc(tmp_path, "init", "--no-scm", "--quiet")
    metrics_file = tmp_path / "data/08_reporting/headline_metrics.json"
    metrics_file.parent.mkdir(parents=True)
    metrics_file.write_text(json.dumps(headline, indent=2))  # as Kedro's JSONDataset saves it

    table = dvc(tmp_path, "metrics", "show", env={"COLUMNS": "400"}).stdout
    assert "mmeb/average" in table and "0.14286" in table, table  # 1/7 at DVC's 5 digits
    widest = max(len(line) for line in table.splitlines())
    assert widest <= 200, f"{widest} columns for {list(headline)}:\n{table}"

    for name in STAGE1_PLOTS:  # what else a default run writes that DVC shows
        (metrics_file.parent / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    shown = [dvc(tmp_path, *command) for command in (("metrics", "show"), ("plots", "show"))]
    assert all("failed to load" not in (run.stdout + run.stderr).lower() for run in shown), shown


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"^Running stage '([\w-]+)':", result.stdout, re.MULTILINE)


def edit_yaml(path: Path, updates: dict[str, Any]) -> None:
    """Sets dotted keys that already exist in ``path``, as a user editing the file would."""
    document = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        *parents, last = dotted.split(".")
        node = document
        for part in parents:
            node = node[part]
        if last not in node:
            raise KeyError(f"{path} has no {dotted}")
        node[last] = value
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def file_md5s(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def shard_hashes(project: Path) -> list[str]:
    manifest = json.loads((project / "data/02_intermediate/m3t_shards/manifest.json").read_text())
    return [s["sha256"] for s in manifest["shards"]]


def untracked_or_changed(root: Path) -> list[str]:
    return git(root, "status", "--porcelain").stdout.splitlines()


@dataclass
class Clone:
    root: Path
    head: str  # the commit it was cloned at
    first_repro: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Clone:
    """This repository's HEAD (committed files only), sized down and committed, after its first `dvc repro`."""
    parent = tmp_path_factory.mktemp("dvc")
    head = git(PROJECT_ROOT, "rev-parse", "HEAD").stdout.strip()
    git(parent, "clone", "--quiet", "--no-checkout", str(PROJECT_ROOT), "muco-flow")
    root = parent / "muco-flow"
    git(root, "checkout", "--quiet", "-b", "dvc-test", head)
    sample = {key: int(value) for key, value in (item.split("=") for item in SMALL_RUN_PARAMS.split(","))}
    edit_yaml(root / "conf/base/parameters_sample.yml", sample)
    edit_yaml(root / "conf/base/parameters_train.yml", {"training.max_steps": 4, "training.save_every": 2})
    edit_yaml(root / "conf/base/parameters_finetune.yml", {"finetune.training.max_steps": 2})
    edit_yaml(root / "conf/base/parameters_cocoa.yml", {"cocoa.warmup_steps": 1, "cocoa.bridged_steps": 1})
    git(root, "commit", "--quiet", "-am", "Test sizes")
    return Clone(root, head, dvc(root, "repro"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_repro_on_a_fresh_clone_runs_the_whole_chain(clone):
    assert stages_run(clone.first_repro) == CHAIN
    assert "is cached" not in clone.first_repro.stdout  # really ran, not restored from a run cache
    root = clone.root
    assert (root / "data/06_models/muco/model/model.safetensors").is_file()
    assert json.loads((root / "data/06_models/train_run.json").read_text())["steps"] == 4
    # DVC wrote no .gitignore of its own: only the lock file is new
    assert untracked_or_changed(root) == ["?? dvc.lock"]


@pytest.mark.slow
def test_metrics_show_and_plots_show(clone):
    root = clone.root
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    headline = shown[""]["data"]["data/08_reporting/headline_metrics.json"]["data"]
    assert headline == json.loads((root / "data/08_reporting/headline_metrics.json").read_text())
    full = json.loads((root / "data/08_reporting/metrics.json").read_text())["headline"]
    assert headline["mmeb/average"] == full["mmeb/average"] and 0.0 <= headline["mmeb/average"] <= 1.0
    table = dvc(root, "metrics", "show")
    assert "mmeb/average" in table.stdout and max(len(line) for line in table.stdout.splitlines()) <= 200, table
    # stage 2's headline is a plain output (a default run makes none): named, it shows
    stage2 = "data/08_reporting/finetune/headline_metrics.json"
    named = json.loads(dvc(root, "metrics", "show", stage2, "--json").stdout)[""]["data"][stage2]["data"]
    assert named == json.loads((root / stage2).read_text())

    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)["data"]
    assert set(plots) == {
        f"data/08_reporting/{name}" for name in ("train_loss.png", "recall_at_k.png", "mmeb_hit_at_1.png")
    }
    assert {plot[0]["type"] for plot in plots.values()} == {"image"}

    shown = dvc(root, "plots", "show")
    assert "failed to load" not in (table.stdout + table.stderr + shown.stdout + shown.stderr).lower()
    page = (root / "dvc_plots/index.html").read_text()
    assert "<img" in page and "vega" not in page.lower()  # nothing to fetch from a CDN
    assert untracked_or_changed(root) == ["?? dvc.lock"]


@pytest.mark.slow
def test_second_repro_runs_nothing(clone):
    assert "Data and pipelines are up to date." in dvc(clone.root, "status").stdout
    again = dvc(clone.root, "repro")
    assert stages_run(again) == []
    assert set(re.findall(r"Stage '([\w-]+)' didn't change, skipping", again.stdout)) == set(CHAIN)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_an_experiment_with_a_training_parameter_reruns_train_and_the_stages_after_it(clone):
    """`dvc exp run --set-param`, as docs/dvc.md runs an experiment: the stages it reruns, and `dvc exp show`."""
    root = clone.root
    before = json.loads((root / "data/06_models/train_run.json").read_text())
    result = dvc(
        root,
        "exp",
        "run",
        "--name",
        "lr-2e-4",
        "--set-param",
        "conf/base/parameters_train.yml:training.learning_rate=2.0e-4",
    )  # the default is 5.0e-4
    # finetune and pretrain_cocoa lay their own training block over it, so the parameter is one of their params too;
    # mine ranks with the stage-1 model, so a new one is mined again
    # (the default finetune trains on the given negatives)
    assert stages_run(result) == ["pretrain_cocoa", "train", "evaluate", "register", "mine", "finetune"]
    after = json.loads((root / "data/06_models/train_run.json").read_text())
    registration = json.loads((root / "data/08_reporting/registration.json").read_text())
    # versions 1 and 2 are the first repro's stage-1 and fine-tuned models
    assert (registration["run_id"], registration["version"]) == (after["mlflow_run_id"], 3)
    finetuned = json.loads((root / "data/06_models/finetune_run.json").read_text())
    assert finetuned["parent_run_id"] == after["mlflow_run_id"]
    assert after["mlflow_run_id"] != before["mlflow_run_id"]
    assert json.loads((root / "data/08_reporting/metrics.json").read_text())["mlflow_run_id"] == after["mlflow_run_id"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["conf/base/parameters_train.yml"]["training"]["learning_rate"] == 2.0e-4
    # DVC emptied data/06_models/muco before the stage ran: one run in the log, from step 0
    log = (root / "data/06_models/muco/logs/rank0.log").read_text()
    assert log.count("rank 0 of") == 1
    assert "resumed from checkpoint" not in log
    steps = [json.loads(line)["step"] for line in (root / "data/06_models/muco/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # the experiment, in the table people compare runs with: its parameter and the headline it scored
    shown = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(dvc(root, "exp", "show", "--csv").stdout))}
    headline = json.loads((root / "data/08_reporting/headline_metrics.json").read_text())
    assert float(shown["lr-2e-4"]["training.learning_rate"]) == 2.0e-4
    assert float(shown["lr-2e-4"]["mmeb/average"]) == pytest.approx(headline["mmeb/average"], abs=5e-6)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_m3t_snapshot_through_an_s3_remote_and_repro_from_its_tag(clone, small_sample_files, tmp_path):
    root = clone.root
    snapshot = root / "data/01_raw/m3t"
    FileTreeDataset(str(snapshot)).save(
        {name: data for name, data in small_sample_files.items() if name.startswith(("M3T_train/", "images/train/"))}
    )
    originals = file_md5s(snapshot)
    rows = pq.read_metadata(snapshot / "M3T_train/M3T.parquet").num_rows
    outputs = []
    with moto_server() as endpoint:
        client = s3_client_for(endpoint)
        client.create_bucket(Bucket="muco-dvc")
        # the README's steps: remote (endpoint tracked, credentials local), dvc add, point ingest at it, tag, push
        dvc(root, "remote", "add", "-d", "storage", "s3://muco-dvc/store")
        dvc(root, "remote", "modify", "storage", "endpointurl", endpoint)
        dvc(root, "remote", "modify", "--local", "storage", "access_key_id", ACCESS_KEY)
        dvc(root, "remote", "modify", "--local", "storage", "secret_access_key", SECRET_KEY)
        outputs.append(dvc(root, "add", "data/01_raw/m3t"))
        edit_yaml(root / "conf/base/globals.yml", {"m3t_source_uri": "data/01_raw/m3t"})
        git(root, "add", ".dvc/config", "data/01_raw/m3t.dvc", "data/01_raw/.gitignore", "conf/base/globals.yml")
        git(root, "commit", "--quiet", "-m", "M3T snapshot v1")
        git(root, "tag", "m3t-v1")
        outputs.append(dvc(root, "push"))

        # the remote holds every file under its md5
        keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="muco-dvc")
                for o in page.get("Contents", [])}  # fmt: skip
        assert {f"store/files/md5/{h[:2]}/{h[2:]}" for h in originals.values()} <= keys
        # the secret is in .dvc/config.local, which git ignores, and in no commit but its test definition
        assert SECRET_KEY in (root / ".dvc/config.local").read_text()
        assert git(root, "check-ignore", "--quiet", ".dvc/config.local", check=False).returncode == 0
        commits = git(root, "rev-list", "--all").stdout.split()
        found = git(root, "grep", "-l", "-I", SECRET_KEY, *commits, check=False).stdout.split()
        assert {hit.split(":", 1)[1] for hit in found} == {"tests/s3_server.py"}
        assert SECRET_KEY not in git(root, "log", "-p", "m3t-v1", "--not", clone.head).stdout

        # no local cache, no workspace copy: pull them back
        shutil.rmtree(root / ".dvc/cache")
        shutil.rmtree(snapshot)
        outputs.append(dvc(root, "pull"))
        assert file_md5s(snapshot) == originals

        # later, a fresh clone of the tag; credentials from the environment, the endpoint from .dvc/config
        git(tmp_path, "clone", "--quiet", str(root), "later")
        later = tmp_path / "later"
        git(later, "checkout", "--quiet", "m3t-v1")
        credentials = {k: v for k, v in s3_env(endpoint).items() if k != "AWS_ENDPOINT_URL"}
        outputs.append(dvc(later, "pull", "data/01_raw/m3t.dvc", env=credentials))
        assert file_md5s(later / "data/01_raw/m3t") == originals
        reproduced = dvc(later, "repro")

        # the same files at an s3:// URI, ingested through boto3
        upload_tree(client, snapshot, "m3t-raw", "v1")
        project = new_project(tmp_path / "project")
        outputs.append(
            kedro_run(project, "--pipelines=ingest", "--params=m3t_source_uri=s3://m3t-raw/v1", env=s3_env(endpoint))
        )

    assert stages_run(reproduced) == CHAIN
    manifest = json.loads((later / "data/02_intermediate/m3t_shards/manifest.json").read_text())
    assert manifest["source"]["uri"] == "data/01_raw/m3t"
    assert manifest["counts"] == {"read": rows, "accepted": rows, "rejected": 0}
    lock = yaml.safe_load((later / "dvc.lock").read_text())
    snapshot_dep = next(d for d in lock["stages"]["ingest"]["deps"] if d["path"] == "data/01_raw/m3t")
    assert snapshot_dep["md5"] == yaml.safe_load((later / "data/01_raw/m3t.dvc").read_text())["outs"][0]["md5"]
    assert shard_hashes(later) == shard_hashes(project)
    assert shard_hashes(later) != shard_hashes(root)  # the clone's shards still come from the bundled sample
    assert json.loads((later / "data/06_models/train_run.json").read_text())["steps"] == 4
    for result in outputs:
        assert SECRET_KEY not in result.stdout + result.stderr
