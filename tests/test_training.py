"""`kedro run --pipelines=train`: real torchrun, 2 DeepSpeed ZeRO-2 processes, MLflow, checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from muco_flow.modeling.backbone import load_backbone
from muco_flow.tracking import TRAINING_METRICS_SECTION
from muco_flow.training.checkpoint import verify_checkpoint
from muco_flow.training.heldout import HELDOUT_METRIC
from muco_flow.training.run_tracking import CHECKPOINT_STEP_TAG, SELECTED_TAG, checkpoint_models
from tests.conftest import KEDRO, PROJECT_ROOT, SMALL_RUN_PARAMS, kedro_run, new_project

BIN = Path(KEDRO).parent

pytestmark = pytest.mark.slow

STEPS = 12
GRACE_S = 25  # training.preemption.grace_s in conf/base


def train_params(output_dir: str, **extra) -> str:
    params = {
        "training.output_dir": output_dir,
        "training.max_steps": STEPS,
        "training.save_every": 4,
        "training.micro_batch_size": 4,
        "training.warmup_steps": 2,
        **extra,
    }
    return "--params=" + ",".join(f"{k}={v}" for k, v in params.items())


def losses(project, output_dir: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (project / output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A project with the small sample ingested and formatted, and one finished 12-step run."""

    root = new_project(tmp_path_factory.mktemp("train") / "project")
    kedro_run(root, "--pipelines=sample", f"--params={SMALL_RUN_PARAMS}")
    kedro_run(root, "--pipelines=backbone")
    kedro_run(root, "--pipelines=data")
    result = kedro_run(root, "--pipelines=train", train_params("data/06_models/run-a"))
    return root, result


def test_a_run_is_tracked_in_mlflow_with_params_metrics_and_artifacts(prepared):
    project, result = prepared
    record = json.loads((project / "data/06_models/train_run.json").read_text())
    assert record["steps"] == STEPS
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.temperature"] == "0.02"
    assert run.data.params["training.embedder.lora.r"] == "16"
    assert run.data.params["training.deepspeed.config"] == "conf/base/deepspeed/zero2.json"
    for metric in ("loss", "learning_rate", "grad_norm", "pairs_per_second", "tokens_per_second"):
        history = client.get_metric_history(run.info.run_id, f"batch/{metric}")  # the section sorting first
        assert [m.step for m in history] == list(range(1, STEPS + 1)), metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for d in ("config", "plots", "metrics") for a in client.list_artifacts(run.info.run_id, d)
    }
    assert {"config/deepspeed.json", "plots/loss_curve.png", "metrics/metrics.jsonl"} <= artifacts
    csv = pd.read_csv(project / "data/08_reporting/train_loss.csv")
    assert csv["loss"].tolist() == pytest.approx(losses(project, "data/06_models/run-a"))
    assert (project / "data/08_reporting/train_loss.png").stat().st_size > 10_000
    # rank 0's progress is streamed; the other rank stays in its log file
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" not in result.stdout
    assert "rank 1 of 2" in (project / "data/06_models/run-a/logs/rank1.log").read_text()


def test_the_final_model_is_a_plain_hugging_face_directory(prepared):
    project, _ = prepared
    model_dir = project / "data/06_models/run-a/model"
    backbone = load_backbone(str(model_dir))
    assert not any("lora" in name for name, _ in backbone.model.named_parameters())
    assert backbone.tokenizer.convert_tokens_to_ids("<|emb|>") is not None


def test_checkpoints_are_readable_by_deepspeeds_own_tools(prepared, tmp_path):
    project, _ = prepared
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoints = project / "data/06_models/run-a/checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000012"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000008", "step-00000012"]  # keep_last 2
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints))
    assert any("lora_A" in k for k in state) and all(torch.isfinite(v).all() for v in state.values())
    # DeepSpeed's own safetensors export: each parameter under one name (no "tensors share memory")
    export = tmp_path / "fp32"
    command = [str(BIN / "python"), "-m", "deepspeed.utils.zero_to_fp32", str(checkpoints), str(export)]
    subprocess.run([*command, "--safe_serialization"], check=True, capture_output=True, timeout=600)
    from safetensors.torch import load_file

    exported = load_file(export / "model.safetensors")
    assert exported.keys() == state.keys() and all(key.startswith("model.") for key in exported)


def test_the_same_seed_gives_the_same_loss_curve(prepared):
    project, _ = prepared
    kedro_run(project, "--pipelines=train", train_params("data/06_models/run-b"))
    assert losses(project, "data/06_models/run-b") == pytest.approx(losses(project, "data/06_models/run-a"), abs=1e-6)
    kedro_run(project, "--pipelines=train", train_params("data/06_models/run-c", **{"training.seed": 1}))
    assert losses(project, "data/06_models/run-c") != pytest.approx(losses(project, "data/06_models/run-a"), abs=1e-6)


def _training_process(parent: psutil.Process, rank: str) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if "muco_flow.training.train" in " ".join(child.cmdline()) and child.environ().get("RANK") == rank:
                return child
        except psutil.Error:
            continue
    return None


def final_weights(project, output_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(project / output_dir / "model/model.safetensors")


def sigkill_rank(rank: str) -> Callable[[subprocess.Popen, str], str]:
    """Stops a training by SIGKILL to one rank (``kill_and_resume``): kedro fails with "training failed"."""

    def stop(run: subprocess.Popen, scenario: str) -> str:
        victim = _training_process(psutil.Process(run.pid), rank=rank)
        assert victim is not None, scenario
        victim.send_signal(signal.SIGKILL)
        output, _ = run.communicate(timeout=120)
        assert run.returncode != 0 and "training failed" in output, scenario
        return output

    return stop


def kill_and_resume(
    project: Path,
    out: str,
    reference: str,
    params: dict,
    *,
    kill_after: int,
    stop: Callable[[subprocess.Popen, str], str],
    pause_s: float = 0.0,
    scenario: str = "",
    before_resume: Callable[[int], None] = lambda steps_done: None,
) -> str:
    """Trains into ``out`` and stops it with ``stop(run, scenario)`` (``sigkill_rank``, ``sigterm``) once
    ``kill_after`` steps are logged (and ``pause_s`` later), calls ``before_resume(steps_done)``, trains again,
    and checks that the resumed run ends with the loss curve and final weights of the uninterrupted run in
    ``reference``. Returns the resumed run's log."""
    metrics = project / out / "metrics.jsonl"
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    run = subprocess.Popen(
        [KEDRO, "run", "--pipelines=train", train_params(out, **params)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after):
        assert run.poll() is None and time.monotonic() < deadline, (
            f"training ended before it could be killed: {scenario}"
        )
        time.sleep(0.05)
    time.sleep(pause_s)
    stop(run, scenario)
    steps_done = len(metrics.read_text().splitlines())
    assert kill_after <= steps_done < STEPS, scenario
    before_resume(steps_done)

    resumed = kedro_run(project, "--pipelines=train", train_params(out, **params))
    # The curve and the final weights are the uninterrupted run's.
    assert losses(project, out) == pytest.approx(losses(project, reference), abs=1e-5), scenario
    expected, got = final_weights(project, reference), final_weights(project, out)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m} ({scenario})")
    return resumed.stdout + resumed.stderr


def test_killed_training_resumes_from_the_last_complete_checkpoint(prepared):
    """SIGKILL a rank at a random step, damage the newest checkpoint, re-run: the uninterrupted run's result."""
    project, _ = prepared
    out = "data/06_models/run-killed"
    seed = int(os.environ.get("MUCO_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    kill_after, rank = rng.randint(7, STEPS - 1), rng.choice(["0", "1"])
    scenario = f"kill rank {rank} after step {kill_after} (MUCO_KILL_SEED={seed} repeats this)"
    killed = {}  # what the killed run left, read before the resume

    def damage_the_newest_checkpoint(steps_done: int) -> None:
        killed["mlflow_run_id"] = json.loads((project / out / "run.json").read_text())["mlflow_run_id"]
        # The newest complete checkpoint (renamed into place only once whole) is damaged on purpose:
        # resume must skip it with a warning and take the one before.
        complete = sorted(int(p.name.split("-")[1]) for p in (project / out / "checkpoints").glob("step-*"))
        newest = killed["newest_checkpoint"] = complete[-1]
        assert newest in {steps_done // 3 * 3, steps_done // 3 * 3 - 3} and complete == [newest - 3, newest], scenario
        victim_file = next((project / out / f"checkpoints/step-{newest:08d}").glob("zero_pp_rank_*_optim_states.pt"))
        victim_file.write_bytes(victim_file.read_bytes()[:100])

    # checkpoints every 3 steps here, every 4 in run-a: how often it saves must not change the result
    log = kill_and_resume(
        project,
        out,
        "data/06_models/run-a",
        {"training.save_every": 3},
        kill_after=kill_after,
        stop=sigkill_rank(rank),
        pause_s=rng.uniform(0, 0.3),  # anywhere in the next step, a checkpoint save included
        scenario=scenario,
        before_resume=damage_the_newest_checkpoint,
    )
    newest = killed["newest_checkpoint"]
    assert f"skipping checkpoint {out}/checkpoints/step-{newest:08d}" in log and "truncated" in log, scenario
    assert f"resumed from checkpoint step-{newest - 3:08d} (step {newest - 3})" in log, scenario

    # ...and it continues the same MLflow run, whose curve is the same (steps logged twice hold equal values)
    reference = losses(project, "data/06_models/run-a")
    assert json.loads((project / out / "run.json").read_text())["mlflow_run_id"] == killed["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_run(killed["mlflow_run_id"]).info.status == "FINISHED"
    history = client.get_metric_history(killed["mlflow_run_id"], "batch/loss")
    assert {m.step for m in history} == set(range(1, STEPS + 1))
    for metric in history:
        assert metric.value == pytest.approx(reference[metric.step - 1], abs=1e-5), (metric.step, scenario)


BEST_RUN = {
    "training.lr_schedule": "constant",
    "training.during_training.every": 2,
    "training.during_training.heldout_conversations": 4,
    "training.select": "best",
    "training.keep_last": 1,
}


@pytest.fixture(scope="module")
def best_run(prepared):
    """A run of conf/base's settings but a constant learning rate, held-out evaluation every 2 steps of 4
    held-out images, checkpoints every 4 (a LoggedModel each), select: best and keep_last 1.

    One run for two tests (the schedule's and evaluation during training's): the suite's time."""
    project, _ = prepared
    out = "data/06_models/run-constant"
    result = kedro_run(project, "--pipelines=train", train_params(out, **BEST_RUN))
    return project, out, result, json.loads((project / "data/06_models/train_run.json").read_text())


def test_select_best_makes_the_best_checkpoint_the_model_and_each_checkpoint_a_logged_model(best_run):
    project, out, result, record = best_run
    assert "held out of training (training.during_training): 4 of 24 records" in result.stdout
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    models = checkpoint_models(client, record["mlflow_run_id"])
    scores = {int(m.tags[CHECKPOINT_STEP_TAG]): {(x.key, x.step) for x in m.metrics} for m in models}
    names = (HELDOUT_METRIC, "heldout/hit_at_1_turn_mean", "heldout/recall_at_5", "heldout/mrr_at_10")
    assert scores == {step: {(name, step) for name in names} for step in (4, 8, 12)}
    value = {int(m.tags[CHECKPOINT_STEP_TAG]): {x.key: x.value for x in m.metrics}[HELDOUT_METRIC] for m in models}
    best = max(value, key=lambda step: (value[step], -step))  # the highest; a tie: the earlier checkpoint
    assert (record["selected"]["step"], record["selected"]["value"]) == (best, value[best])
    assert [m.tags.get(SELECTED_TAG) for m in models] == ["true" if s == best else None for s in (4, 8, 12)]
    curve = client.get_metric_history(record["mlflow_run_id"], HELDOUT_METRIC)
    assert sorted(m.step for m in curve) == [2, 4, 6, 8, 10, 12]
    # keep_last 1 keeps the newest checkpoint, and the best beside it
    kept = sorted(int(p.name.split("-")[1]) for p in (project / out / "checkpoints").glob("step-*"))
    assert kept == sorted({best, 12})
    if best != 12:
        assert f"training.select: best: the model is step {best}'s" in result.stdout


def test_a_resumed_select_best_run_keeps_the_best_from_its_checkpoint(best_run):
    """The same command again resumes from step 12's checkpoint, whose state holds the best so far: no step is
    trained, and the same checkpoint's weights become the model again."""
    project, out, _, record = best_run
    weights = final_weights(project, out)
    again = kedro_run(project, "--pipelines=train", train_params(out, **BEST_RUN))
    assert "resumed from checkpoint step-00000012 (step 12)" in again.stdout
    assert json.loads((project / "data/06_models/train_run.json").read_text())["selected"] == record["selected"]
    for name, tensor in final_weights(project, out).items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)


def sigterm(everyone: bool, grace_s: float) -> Callable[[subprocess.Popen, str], str]:
    """Stops a training by SIGTERM to kedro and every process under it at once, as SLURM preempts a job, or to
    kedro alone, as `kill` does; checks that none of them outlives kedro by more than ``grace_s``."""

    def stop(run: subprocess.Popen, scenario: str) -> str:
        kedro = psutil.Process(run.pid)
        processes = [kedro, *kedro.children(recursive=True)]  # torchrun, the ranks, their batch workers
        assert sum("muco_flow.training.train" in " ".join(p.cmdline()) for p in processes) >= 2, scenario
        for process in processes if everyone else [kedro]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=grace_s + 60)
        _, outliving = psutil.wait_procs(processes[1:], timeout=grace_s)
        assert not outliving, (outliving, scenario)
        assert run.returncode == 1, output[-3000:]
        return output

    return stop


@pytest.mark.parametrize("everyone", [True, False], ids=["every-process", "kedro-alone"])
def test_sigterm_checkpoints_the_current_step_and_the_requeued_run_resumes_there(prepared, everyone):
    """SIGTERM mid-epoch: every rank ends the step, checkpoints it, the run is marked preempted; the same
    command resumes at that step, logs no step twice and ends with the uninterrupted run's weights."""
    project, _ = prepared
    out = f"data/06_models/run-preempted-{'all' if everyone else 'kedro'}"
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    stopped: dict = {}  # what the stopped run left, read before the resume
    signal_them = sigterm(everyone, grace_s=GRACE_S)

    def stop(run: subprocess.Popen, scenario: str) -> str:
        stopped["output"] = signal_them(run, scenario)
        return stopped["output"]

    def stopped_at_a_checkpoint(steps_done: int) -> None:
        run_id = json.loads((project / out / "run.json").read_text())["mlflow_run_id"]
        stopped.update(step=steps_done, run_id=run_id)
        checkpoints = project / out / "checkpoints"
        assert (checkpoints / "latest").read_text() == f"step-{steps_done:08d}"  # the step in progress, saved
        assert verify_checkpoint(checkpoints / f"step-{steps_done:08d}", *fingerprint_and_world(project, out)) is None
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert {key: run.data.tags.get(key) for key in ("muco_flow.stopped", "muco_flow.stopped_at_step")} == {
            "muco_flow.stopped": "preempted",
            "muco_flow.stopped_at_step": str(steps_done),
        }
        assert (project / out / "train.lock").read_text() == ""  # released

    log = kill_and_resume(
        project,
        out,
        "data/06_models/run-a",
        {},
        kill_after=5,  # the last checkpoint is step 4 (save_every 4)
        stop=stop,
        scenario=f"SIGTERM to {'every process' if everyone else 'kedro'}",
        before_resume=stopped_at_a_checkpoint,
    )
    step = stopped["step"]
    assert 5 <= step < STEPS
    expected = (
        f"training preempted at step {step} by SIGTERM: every rank stopped after it and checkpoint step {step} "
        f"holds it; run the same command again to resume from step {step}"
    )
    assert expected in stopped["output"], stopped["output"][-3000:]
    assert f"resumed from checkpoint step-{step:08d} (step {step})" in log
    # the same MLflow run, finished, with every step once
    assert json.loads((project / out / "run.json").read_text())["mlflow_run_id"] == stopped["run_id"]
    run = client.get_run(stopped["run_id"])
    assert run.info.status == "FINISHED" and "muco_flow.stopped" not in run.data.tags
    steps = [m.step for m in client.get_metric_history(stopped["run_id"], f"{TRAINING_METRICS_SECTION}/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))


def fingerprint_and_world(project: Path, out: str) -> tuple[str, int]:
    config = json.loads((project / out / "run_config.json").read_text())
    return config["fingerprint"], config["training"]["launcher"]["processes_per_node"]


def test_a_non_finite_loss_stops_the_run_with_a_clear_error_and_no_final_model(prepared):
    """A temperature of 1e-300 is 0 in float32: the logits are infinite, the loss NaN from the first step."""
    project, _ = prepared
    out = "data/06_models/run-nan"
    params = train_params(out, **{"training.temperature": "1e-300", "training.max_steps": 3})
    result = kedro_run(project, "--pipelines=train", params, check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(r"training stopped at step 1: the loss is (nan|inf|-inf); no checkpoint", log), log[-3000:]
    # each rank's one-line cause (the launcher also puts it first in the Kedro error)
    assert re.search(r"muco-flow training error \(rank [01]\): NonFiniteLossError: training stopped at step 1", log)
    assert not (project / out / "model").exists()
    assert not list((project / out / "checkpoints").glob("step-*"))
    # the MLflow run is not left RUNNING: it ended FAILED, with the cause as a tag
    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(
        json.loads((project / out / "run.json").read_text())["mlflow_run_id"]
    )
    assert run.info.status == "FAILED"
    assert run.data.tags["muco_flow.error"].startswith("NonFiniteLossError: training stopped at step 1: the loss is")


def test_a_training_that_restarts_from_step_0_gets_a_new_mlflow_run_and_ends_the_old_one(prepared):
    """Another number of processes cannot resume the checkpoints: a new run, with its own params and curve."""
    project, _ = prepared
    out = "data/06_models/run-restart"
    short = {"training.max_steps": 4, "training.save_every": 2}
    kedro_run(project, "--pipelines=train", train_params(out, **short))
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    first = json.loads((project / out / "run.json").read_text())["mlflow_run_id"]
    client.update_run(first, status="RUNNING")  # as a training killed before its end leaves it

    result = kedro_run(
        project, "--pipelines=train", train_params(out, **short, **{"training.launcher.processes_per_node": 1})
    )
    log = result.stdout + result.stderr
    assert "it was written by 2 processes, this run has 1" in log
    second = json.loads((project / out / "run.json").read_text())["mlflow_run_id"]
    assert second != first
    assert f"ended MLflow run {first} (KILLED)" in log
    assert client.get_run(first).info.status == "KILLED"
    run = client.get_run(second)
    assert run.info.status == "FINISHED" and run.data.params["training.launcher.processes_per_node"] == "1"
    assert [m.step for m in client.get_metric_history(second, "batch/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(first, "batch/loss")] == [1, 2, 3, 4]  # untouched
    identity = json.loads((project / out / "model/model_identity.json").read_text())
    assert identity["mlflow_run_id"] == second


def test_a_moved_project_resumes_its_checkpoints(prepared, tmp_path):
    """The fingerprint hashes the backbone's files, not its absolute path: a copy elsewhere resumes at step 12."""
    import shutil

    project, _ = prepared
    moved = tmp_path / "moved" / "project"
    shutil.copytree(project, moved, ignore=shutil.ignore_patterns("run-[!a]*"))
    result = kedro_run(moved, "--pipelines=train", train_params("data/06_models/run-a"))
    assert f"resumed from checkpoint step-{STEPS:08d} (step {STEPS})" in result.stdout + result.stderr
    assert losses(moved, "data/06_models/run-a") == losses(project, "data/06_models/run-a")
    # ...and its MLflow store names the copy's artifact folder, not the original's
    assert "(moved or copied): now" in result.stdout + result.stderr
    run_id = json.loads((moved / "data/06_models/run-a/run.json").read_text())["mlflow_run_id"]
    artifacts = MlflowClient(f"sqlite:///{moved / 'mlflow.db'}").get_run(run_id).info.artifact_uri
    assert artifacts.startswith(str(moved / "mlruns"))


def test_two_nodes_of_one_process_train_as_one_node_of_two(prepared, monkeypatch):
    """torchrun's static rendezvous on loopback: 2 nodes x 1 process reproduce run-a (1 node x 2 processes)."""
    import copy
    import io
    import threading

    from muco_flow.training.launch import launch_training
    from tests.servers import free_port

    project, _ = prepared
    monkeypatch.chdir(project)  # the run config's paths are relative to the project
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as run-a's 2 processes on 2 cores had: the same arithmetic
    reference = json.loads((project / "data/06_models/run-a/run_config.json").read_text())
    out, port = "data/06_models/run-two-nodes", free_port()
    errors: list[BaseException] = []

    def node(node_rank: int) -> None:
        config = copy.deepcopy(reference)
        config["output_dir"] = config["training"]["output_dir"] = out
        config["training"]["launcher"] |= {"nodes": 2, "node_rank": node_rank, "processes_per_node": 1}
        config["training"]["launcher"] |= {"master_addr": "127.0.0.1", "master_port": port}
        try:
            launch_training(config, stream=io.StringIO())
        except BaseException as err:  # re-raised from the test's thread below
            errors.append(err)

    nodes = [threading.Thread(target=node, args=(node_rank,)) for node_rank in range(2)]
    for thread in nodes:
        thread.start()
    for thread in nodes:
        thread.join(timeout=900)
    assert not errors and not any(thread.is_alive() for thread in nodes), errors
    assert "rank 1 of 2" in (project / out / "logs/rank1.log").read_text()
    assert losses(project, out) == pytest.approx(losses(project, "data/06_models/run-a"), abs=1e-5)
    # ZeRO-2 partitions the optimizer state: the last checkpoint holds one shard per rank, one from each node
    final = project / out / f"checkpoints/step-{STEPS:08d}"
    shards = sorted(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1) for p in final.glob("*optim_states.pt"))
    assert shards == ["0", "1"]
    # each node keeps the config it ran with
    for node_rank in range(2):
        config = json.loads((project / out / f"run_config.node{node_rank:02d}.json").read_text())
        assert config["training"]["launcher"]["node_rank"] == node_rank
    assert not (project / out / "run_config.json").exists()


@pytest.mark.full_size  # about 9 minutes on 2 cores, a fifth of the suite: `make test-all` runs it
@pytest.mark.timeout(2400)
def test_the_default_run_on_the_bundled_sample_learns_and_registers_a_challenger(project):
    """`kedro run` with every default: 2048 images, 2 processes, ZeRO-2 (what `make run` does)."""
    kedro_run(project, timeout_s=1800)  # 9-15 minutes on 2 cores: the whole `make run`
    record = json.loads((project / "data/06_models/train_run.json").read_text())
    assert record["loss_last_10pct"] < 0.5 * record["loss_first_10pct"]
    assert record["steps"] == 2 * 2048 // (2 * 8)  # epochs x samples / (processes x micro batch)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("muco-embedder", "challenger")
    assert version.run_id == record["mlflow_run_id"]
    metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
    assert float(version.tags["primary_metric_value"]) == pytest.approx(metrics["model"]["mmeb"]["average"])
    # Issues 5 and 14 ask for 3x the untrained backbone; seeds 0, 1 and 2 give 3.03x, 3.33x and 3.02x here (README
    # "Evaluation"). The margin below leaves room for another CPU's rounding, not for a model that stops learning.
    assert metrics["model"]["mmeb"]["average"] >= 2.5 * metrics["baseline"]["mmeb"]["average"]
    # M-BEIR's local average (recall@5 per task, UniIR's instructions): 0.45 against 0.13 on seed 0
    trained, baseline = metrics["model"]["mbeir"]["average"]["local"], metrics["baseline"]["mbeir"]["average"]["local"]
    assert trained >= 2 * baseline and trained >= baseline + 0.2


def test_evaluate_scores_the_trained_model_and_the_baseline_into_the_training_run(prepared):
    project, _ = prepared
    kedro_run(project, "--pipelines=train", train_params("data/06_models/run-a"))  # train_run.json -> run-a again
    kedro_run(project, "--pipelines=evaluate")
    metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
    assert set(metrics["model"]["mmeb"]["datasets"]) == {
        "MiniShapes-Cls", "MiniShapes-Count", "MiniShapes-Color", "MiniShapes-I2T", "MiniShapes-T2I",
        "MiniShapes-Grounding",
    }  # fmt: skip
    assert set(metrics["model"]["m3t_heldout"]) == {
        "classification",
        "global_vqa",
        "local_vqa",
        "creative_vqa",
        "retrieval",
    }
    average = metrics["model"]["mmeb"]["average"]
    assert metrics["delta_vs_baseline"]["mmeb/average"] == pytest.approx(
        average - metrics["baseline"]["mmeb"]["average"]
    )
    for name in ("evaluation_report.md", "mmeb_hit_at_1.png", "recall_at_k.png", "recall_at_k.csv"):
        assert (project / "data/08_reporting" / name).stat().st_size > 0
    record = json.loads((project / "data/06_models/train_run.json").read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(record["mlflow_run_id"])
    assert run.data.metrics["eval/mmeb/average"] == pytest.approx(average)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {
        "evaluation/metrics.json",
        "evaluation/report.md",
        "evaluation/mmeb_hit_at_1.png",
    }


def test_the_notebook_shows_top_k_retrievals_of_the_latest_model(prepared, tmp_path):
    """notebooks/explore_latest_model.ipynb, executed as a user would, from the project's notebooks/."""
    import nbformat
    from nbclient import NotebookClient

    project, _ = prepared
    (project / "notebooks").mkdir(exist_ok=True)
    notebook = nbformat.read(PROJECT_ROOT / "notebooks/explore_latest_model.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(project / "notebooks")}}).execute()
    nbformat.write(notebook, tmp_path / "executed.ipynb")  # kept with pytest's tmp files for a look

    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") for output in outputs)
    record = json.loads((project / "data/06_models/train_run.json").read_text())
    assert f"model: {project / record['model_dir']}" in text
    assert f"MLflow run {record['mlflow_run_id']}" in text
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) == 4  # answers for two turn types, caption -> image, recall@1 bars


def test_register_and_promote_pipelines(prepared):
    """A tagged `challenger` version, no duplicate on a re-run, and promotion only when configured."""
    import hashlib

    project, _ = prepared
    kedro_run(project, "--pipelines=train", train_params("data/06_models/run-a"))  # train_run.json -> run-a
    kedro_run(project, "--pipelines=evaluate")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "conf"], cwd=project, check=True)
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", *identity, "commit", "-qm", "conf"], cwd=project, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, text=True, capture_output=True).stdout.strip()
    kedro_run(project, "--pipelines=register")
    kedro_run(project, "--pipelines=register")  # idempotent

    record = json.loads((project / "data/06_models/train_run.json").read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'muco-embedder'")
    assert len(versions) == 1
    version = client.get_model_version_by_alias("muco-embedder", "challenger")
    run = client.get_run(record["mlflow_run_id"])
    manifest = json.loads((project / "data/02_intermediate/m3t_shards/manifest.json").read_text())
    expected_data = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    expected_params = hashlib.sha256(json.dumps(run.data.params, sort_keys=True).encode()).hexdigest()
    metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
    assert version.run_id == record["mlflow_run_id"]
    assert version.tags["run_id"] == record["mlflow_run_id"]
    assert version.tags["data_fingerprint"] == expected_data
    assert version.tags["params_hash"] == expected_params
    # training ran outside git; registration falls back to the checkout's commit
    assert run.data.tags["mlflow.source.git.commit"] == "unknown"
    assert version.tags["git_commit"] == commit
    assert version.tags["primary_metric"] == "mmeb/average"
    assert float(version.tags["primary_metric_value"]) == pytest.approx(metrics["model"]["mmeb"]["average"])
    assert len(version.tags) <= 8 and "mmeb/average" in version.description
    assert version.tags["promotion.eligible"] == "true"  # no champion yet: a person may crown it
    assert version.description.startswith("**Promotion gate:** eligible for champion: no champion yet")
    registration = json.loads((project / "data/08_reporting/registration.json").read_text())
    assert registration["version"] == int(version.version)

    refused = kedro_run(project, "--pipelines=promote", check=False)
    assert refused.returncode != 0  # a refusal is not a success: scripts and CI see it
    assert f"promotion refused for muco-embedder version {version.version}: no champion yet" in refused.stderr
    decision = json.loads((project / "data/08_reporting/promotion.json").read_text())  # written all the same
    assert decision["promoted"] is False and "promote_first is not set" in decision["reason"]
    kedro_run(project, "--pipelines=promote", "--params=registry.promotion.promote_first=true")
    assert client.get_model_version_by_alias("muco-embedder", "champion").version == version.version


@pytest.mark.timeout(1800)  # registers first (three kedro runs), then starts `mlflow ui`
def test_the_mlflow_ui_shows_a_named_described_run_and_a_version_with_few_tags(prepared):
    """Headless Chromium on `mlflow ui` over the project's store, as a person opens it after `make run`."""

    from tests.servers import ARTIFACTS, background_server, free_port, headless_chromium

    project, _ = prepared
    if not (project / "data/08_reporting/registration.json").exists():  # run on its own: register first
        test_register_and_promote_pipelines(prepared)
    record = json.loads((project / "data/06_models/train_run.json").read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.run_name == f"stage1-tiny-qwen2-vl-{STEPS}steps-seed0"
    assert run.data.tags["mlflow.source.name"] == "kedro run --pipelines=train"
    assert {"mlflow.user", "mlflow.source.git.commit", "kedro.pipeline", "kedro.env"} <= set(run.data.tags)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["m3t_shards"]
    assert any(key.startswith("system/") for key in run.data.metrics)  # MLflow's system metrics
    version = client.get_model_version_by_alias("muco-embedder", "challenger")
    assert len(version.tags) <= 9  # lineage (7), promotion.eligible, promotion

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = f"sqlite:///{project / 'mlflow.db'}"
    command = [str(BIN / "mlflow"), "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)]
    experiment = run.info.experiment_id
    server = background_server(command, f"{url}/health", timeout_s=120, log=project / "ui.log")
    with server, headless_chromium() as page:
        page.goto(f"{url}/#/experiments/{experiment}/runs/{run.info.run_id}", wait_until="domcontentloaded")
        page.get_by_text(run.info.run_name).first.wait_for(timeout=60_000)
        page.get_by_text("MuCo embedder trained from").first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_run_overview.png"), full_page=True)

        # "Model metrics" opens with the training curves: the batch section is above every eval section
        page.goto(f"{url}/#/experiments/{experiment}/runs/{run.info.run_id}/model-metrics")
        training = page.get_by_text(TRAINING_METRICS_SECTION, exact=True).first
        training.wait_for(timeout=60_000)
        page.wait_for_timeout(3000)  # the charts draw after their titles
        page.screenshot(path=str(ARTIFACTS / "mlflow_run_model_metrics.png"))
        section_title = re.compile(rf"^({TRAINING_METRICS_SECTION}|eval|eval_delta)(/[\w/]+)?$")
        sections = page.get_by_text(section_title).all_inner_texts()
        metrics_page = page.inner_text("body")

        page.goto(f"{url}/#/models/muco-embedder/versions/{version.version}", wait_until="domcontentloaded")
        page.get_by_text("primary_metric_value").first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_model_version.png"), full_page=True)
        version_page = page.inner_text("body")
    assert sections[0] == TRAINING_METRICS_SECTION and any(name.startswith("eval/") for name in sections), sections
    # the first chart's legend names the run and its metric: a training curve, above any evaluation section
    assert metrics_page.index(f"({TRAINING_METRICS_SECTION}/") < metrics_page.index("eval/")
    shown_tags = [key for key in version.tags if key in version_page]
    assert len(shown_tags) == len(version.tags) <= 9


def test_grad_cache_run_killed_and_resumed_ends_as_the_uninterrupted_one(prepared):
    """GradCache in chunks of 2 (2 forwards per side and step) under ZeRO-2, SIGKILLed mid-run and resumed."""
    project, _ = prepared
    grad_cache = {"training.grad_cache.chunk_size": 2, "training.save_every": 3}
    kedro_run(project, "--pipelines=train", train_params("data/06_models/run-gc", **grad_cache))
    log = kill_and_resume(
        project,
        "data/06_models/run-gc-killed",
        "data/06_models/run-gc",
        grad_cache,
        kill_after=7,
        stop=sigkill_rank("1"),
    )
    assert "resumed from checkpoint step-00000006 (step 6)" in log


def test_the_learning_rate_follows_the_configured_schedule(prepared, best_run):
    project, _ = prepared

    def rates(output_dir: str) -> list[float]:
        lines = (project / output_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["learning_rate"] for line in lines]

    # run-a: conf/base's cosine to 0.1 of 5e-4, after 2 warmup steps, over 12 steps. By hand, step s
    # (from 0): (s+1)/2 in warmup, then 0.1 + 0.9 (1 + cos(pi (s-2)/10)) / 2: 1, 0.977975, ..., 0.122025
    cosine = rates("data/06_models/run-a")
    assert len(cosine) == STEPS
    assert cosine[:4] == pytest.approx([2.5e-4, 5e-4, 5e-4, 0.977975 * 5e-4], rel=1e-5)
    assert cosine[-1] == pytest.approx(0.122025 * 5e-4, rel=1e-5)
    # best_run: the constant schedule (with evaluation during training, which leaves the rate as it is)
    _, constant, _, _ = best_run
    assert rates(constant) == pytest.approx([2.5e-4] + [5e-4] * (STEPS - 1), rel=1e-6)


def test_cocoa_stage_0_trains_on_reconstruction_resumes_after_a_kill_and_stage_1_starts_from_it(prepared):
    """`pretrain_cocoa` (2 warm-up + 2 bridged steps) killed in its bridged phase and resumed, then `train`
    from its model through training.init_from.

    Last in this module: the `train` run here rewrites data/06_models/train_run.json.
    """
    project, _ = prepared
    out = "data/06_models/cocoa"
    params = "--params=cocoa.warmup_steps=2,cocoa.bridged_steps=2,training.micro_batch_size=4,training.save_every=2"
    began = time.perf_counter()
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    killed = subprocess.Popen(
        [KEDRO, "run", "--pipelines=pretrain_cocoa", params],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = project / out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # step 2's checkpoint is saved
        assert killed.poll() is None and time.monotonic() < deadline, "stage 0 ended before it could be killed"
        time.sleep(0.05)
    sigkill_rank("1")(killed, "kill stage 0 after step 3")
    killed_run = json.loads((project / out / "run.json").read_text())["mlflow_run_id"]
    resumed = kedro_run(project, "--pipelines=pretrain_cocoa", params)
    stage_0_seconds = time.perf_counter() - began
    assert "resumed from checkpoint step-00000002 (step 2)" in resumed.stdout + resumed.stderr

    cocoa = json.loads((project / "data/06_models/cocoa_run.json").read_text())
    assert cocoa["steps"] == 4 and cocoa["model_dir"] == f"{out}/model" and cocoa["mlflow_run_id"] == killed_run
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    # the warm-up's two reconstruction losses, then the bridged one (after the resume too)
    assert all({"cocoa/text_loss", "cocoa/image_loss"} <= line.keys() for line in lines[:2])
    assert all("cocoa/bridged_loss" in line and "cocoa/text_loss" not in line for line in lines[2:])
    values = [v for line in lines for k, v in line.items() if k.startswith("cocoa/")]
    assert len(values) == 6 and all(math.isfinite(v) and v > 0 for v in values)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(cocoa["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("stage0-")
    for name, steps in (("text_loss", {1, 2}), ("image_loss", {1, 2}), ("bridged_loss", {3, 4})):
        history = client.get_metric_history(cocoa["mlflow_run_id"], f"batch/cocoa/{name}")
        assert {m.step for m in history} == steps, name
    # the saved model is the backbone's shape: the image head stayed behind
    saved = load_backbone(str(project / out / "model"))
    assert not any("image_head" in name for name, _ in saved.model.named_parameters())

    init = {"training.init_from": f"{out}/model", "training.max_steps": 2}
    kedro_run(project, "--pipelines=train", train_params("data/06_models/from-cocoa", **init))
    stage_1 = json.loads((project / "data/06_models/train_run.json").read_text())
    lineage = {"source": f"{out}/model", "run_id": cocoa["mlflow_run_id"]}
    assert stage_1["init_from"] == lineage | {"content_hash": cocoa["model_content_hash"]}
    tags = client.get_run(stage_1["mlflow_run_id"]).data.tags
    assert tags["muco_flow.init_from_run_id"] == cocoa["mlflow_run_id"]
    assert tags["muco_flow.init_from_content_hash"] == cocoa["model_content_hash"]
    print(f"pretrain_cocoa (4 steps, killed after 3 and resumed) took {stage_0_seconds:.1f} s")
