"""Starts distributed training: resolves one run configuration and runs torchrun on it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from muco_flow.torchrun import LaunchInterrupted, on_cpu, run_torchrun
from muco_flow.training.config import TrainingConfig
from muco_flow.training.deepspeed_config import training_deepspeed_config, validate_deepspeed_config
from muco_flow.training.lock import lock_file_name, output_folder_lock
from muco_flow.training.preemption import Preemption


class TrainingFailedError(RuntimeError):
    """A training process exited with an error; the message holds its traceback."""


class TrainingPreempted(LaunchInterrupted):
    """The ranks stopped on SIGTERM or SIGUSR1 after one step, every one of them, and have ended.

    What `kedro run` ends with (exit status 1, this one line, no traceback):
    "training preempted at step s by SIGTERM: ...; run the same command again
    to resume from step s". The training lock is released by then; the MLflow
    run is KILLED with the tag ``muco_flow.stopped=preempted``.
    """

    def __init__(self, preemption: Preemption, tail: list[str] | None = None) -> None:
        super().__init__(
            preemption.signal_name,
            tail,
            f"training preempted at step {preemption.step} by {preemption.signal_name}: every rank stopped after "
            f"it and {preemption.outcome()}; run the same command again to resume from step {preemption.resume_step}",
        )
        self.preemption = preemption


# What run_training_stage runs: MuCo's stage 1 and stage 2, and CoCoA's stage 0 (docs/cocoa.md)
STAGES = ("train", "finetune", "cocoa")

# The start of the line each failing rank prints to stderr with its exception.
ERROR_MARKER = "muco-flow training error"


def resolve_run_config(
    *,
    training: TrainingConfig,
    backbone: dict[str, Any],
    encode_template: str,
    tracking_uri: str,
    experiment: str,
    checkpoint: str,
    conversations_dir: str,
    shards_dir: str,
    stage: str = "train",
    parent_run_id: str | None = None,
    cocoa: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything one rank needs, in one JSON-serialisable dict, plus its fingerprint.

    ``training`` goes in as ``to_dict()``: each rank reads it back with ``TrainingConfig.from_dict``.

    ``stage``: "train" (MuCo's stage 1, M3T conversations), "finetune" (stage 2, MMEB-train samples) or
    "cocoa" (CoCoA's stage 0 on stage 1's conversations, with ``cocoa``: ``CocoaConfig.objective()``).
    ``parent_run_id``: the stage-1 run a fine-tuning starts from; part of the
    fingerprint, so that a new stage-1 model at the same path is not resumed onto.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if (stage == "cocoa") != (cocoa is not None):
        raise ValueError("the cocoa stage, and only it, takes the cocoa objective's settings")
    cpu = on_cpu()
    deepspeed = training_deepspeed_config(training, on_cpu=cpu)
    validate_deepspeed_config(deepspeed)
    validate_grad_cache(training, deepspeed)
    config = {
        "stage": stage,
        "output_dir": training.output_dir,
        "checkpoint": checkpoint,
        "conversations_dir": conversations_dir,
        "shards_dir": shards_dir,
        "backbone": backbone,
        "training": training.to_dict(),
        "deepspeed": deepspeed,
        "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment, "run_name": training.run_name},
        "encode_template": encode_template,
    }
    # What decides the weights: a checkpoint made under another fingerprint is not resumed. Contents, not
    # paths: a project moved or copied elsewhere resumes its checkpoints. Which training settings count is
    # declared on their fields (training/config.py).
    decisive = {k: config[k] for k in ("backbone", "deepspeed", "encode_template")} | {
        "checkpoint": _checkpoint_fingerprint(checkpoint),
        "training": training.fingerprinted(),
        "data": _data_fingerprint(conversations_dir),
    }
    if parent_run_id:
        config["parent_run_id"] = decisive["parent_run_id"] = parent_run_id
    if cocoa is not None:  # the objective decides the weights: its every setting
        config["cocoa"] = decisive["cocoa"] = cocoa
    config["fingerprint"] = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()
    return config


def validate_grad_cache(training: TrainingConfig, deepspeed: dict[str, Any]) -> None:
    """Raises ValueError naming the setting if `training.grad_cache` cannot run with the others."""
    if training.grad_cache.chunk_size is None:
        return
    if training.gradient_accumulation_steps != 1:
        # DeepSpeed coalesces the chunks' gradient reduction within one step only
        raise ValueError(
            "training.grad_cache replaces gradient accumulation: set training.gradient_accumulation_steps to 1 "
            f"(it is {training.gradient_accumulation_steps}) and raise training.micro_batch_size instead, "
            "which also makes every conversation a negative of the others"
        )
    if deepspeed["zero_optimization"]["stage"] == 0:
        raise ValueError("training.grad_cache needs ZeRO stage 1, 2 or 3 (training.deepspeed.config has stage 0)")


def _checkpoint_fingerprint(checkpoint: str) -> str:
    """The backbone directory's content hash (every file read once per launch); a name that is no directory as is."""
    from muco_flow.training.model_identity import content_hash

    return content_hash(checkpoint) if checkpoint and Path(checkpoint).is_dir() else checkpoint


def _data_fingerprint(conversations_dir: str) -> str:
    manifest = Path(conversations_dir) / "manifest.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else "missing"


TRAINING_MODULE = "muco_flow.training.train"


def run_config_name(launcher: dict[str, Any]) -> str:
    """The file the run config is written to: one per node when several share the output folder.

    Each node keeps the config it ran with (its node_rank, and paths or settings
    that may differ per node) instead of the last node to start overwriting it.
    """
    if launcher.get("nodes", 1) > 1:
        return f"run_config.node{launcher.get('node_rank', 0):02d}.json"
    return "run_config.json"


def launch_training(config: dict[str, Any], stream=None) -> None:
    """Runs torchrun on ``config``; streams rank 0's output; raises with the failing rank's traceback.

    Holds the output folder's lock throughout: a second training into the same folder is refused.
    """
    node_rank = config["training"]["launcher"].get("node_rank", 0)
    with output_folder_lock(config["output_dir"], lock_file_name(node_rank)):
        _launch_training(config, stream)


def _launch_training(config: dict[str, Any], stream=None) -> None:
    output_dir = Path(config["output_dir"])
    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in logs.glob("rank*.error"):
        stale.unlink()
    launcher = config["training"]["launcher"]
    config_path = output_dir / run_config_name(launcher)
    config_path.write_text(json.dumps(config, indent=2))
    # the ranks' grace (their last step and checkpoint) is the launcher's and torchrun's before they kill
    grace_s = config["training"]["preemption"]["grace_s"]
    try:
        returncode, causes, tail = run_torchrun(
            config_path, launcher, TRAINING_MODULE, stream, ERROR_MARKER, grace_s=grace_s
        )
    except LaunchInterrupted as stopped:  # this process was signalled (kedro, SLURM): did the ranks stop cleanly?
        preemption = Preemption.from_output(stopped.tail)
        if preemption is None:
            raise
        raise TrainingPreempted(preemption, stopped.tail) from None
    if returncode != 0:
        preemption = Preemption.from_output(tail)  # only the ranks were signalled
        if preemption is not None:
            raise TrainingPreempted(preemption, tail)
        raise TrainingFailedError(failure_message(logs, returncode, causes, tail))


def failure_message(logs: Path, returncode: int, causes: list[str], tail: list[str]) -> str:
    """Why training failed: each failing rank's one-line cause, then its traceback or the last output.

    The causes come from the output stream, so they arrive even when the error
    files could not be written or are empty (a full disk).
    """
    reports = []
    for error_file in sorted(logs.glob("rank*.error")):
        try:
            text = error_file.read_text()
        except OSError:
            continue
        if text.strip():
            reports.append(f"--- {error_file.stem} ---\n{text}")
    lines = [f"training failed (exit {returncode}); see {logs}", *causes]
    if reports:
        lines += reports
    else:
        lines += ["last output:", "".join(tail[-40:])]
    return "\n".join(lines)
