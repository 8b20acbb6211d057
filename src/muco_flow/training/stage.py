"""One MuCo training stage under torchrun, from the Kedro node's parameters to the run record.

`train` (stage 1, M3T conversations) and `finetune` (stage 2, MMEB-train
samples) run the same function: check the data and the tracking server,
resolve one run configuration, launch the ranks, read back what they wrote.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from muco_flow.data.conversations import FormatConfig
from muco_flow.tracking import (
    canonical_hash,
    check_tracking_server,
    context_tags,
    resolve_tracking_uri,
    run_name,
    source_commit,
)
from muco_flow.training.config import TrainingConfig
from muco_flow.training.data import ConversationBatches, check_conversations_match_shards
from muco_flow.training.init_model import start_model
from muco_flow.training.launch import launch_training, resolve_run_config
from muco_flow.training.model_identity import ModelIdentityError, read_model_identity
from muco_flow.training.report import loss_curve_figure, read_metrics
from muco_flow.training.run_tracking import METRICS_FILE, RUN_FILE, SELECTION_FILE

# The tag that names a fine-tuning run's stage-1 run (not mlflow.parentRunId: the runs may be in different experiments)
PARENT_RUN_TAG = "muco_flow.parent_run_id"
TAG_NAMESPACE = "muco_flow"  # of the run tags data_lineage names
# The MLflow run's name when training.run_name is empty
DEFAULT_RUN_NAME = "{stage}-{checkpoint}-{steps}steps-seed{training.seed}"
# What a run name calls each stage: MuCo's paper numbers them
STAGE_NAMES = {"cocoa": "stage0", "train": "stage1", "finetune": "stage2"}


def run_training_stage(
    conversations_dir: str,
    shards_dir: str,
    checkpoint: str,
    training: Mapping[str, Any],
    backbone: dict[str, Any],
    format_params: dict[str, Any],
    mlflow: dict[str, Any],
    kedro_run: dict[str, Any],
    *,
    stage: str = "train",
    parent_run_id: str | None = None,
    data_lineage: Mapping[str, str] | None = None,
    cocoa: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame, Any]:
    """One training stage under torchrun: `train` (stage 1), `finetune` (stage 2 from ``parent_run_id``'s model)
    or `cocoa` (CoCoA's stage 0 on stage 1's conversations, ``cocoa`` its objective's settings).

    The `train` pipeline's node: ``training`` is the `training` parameters,
    checked into a TrainingConfig here. Returns the run record, loss history
    and loss plot; the record names the parent run, so that register can name
    both. Re-running resumes from the newest complete checkpoint of the same settings.
    """
    check_conversations_match_shards(Path(conversations_dir), Path(shards_dir))
    settings = TrainingConfig.from_dict(training)
    tracking_uri = resolve_tracking_uri(mlflow.get("tracking_uri"))
    check_tracking_server(tracking_uri)  # before any data or model is loaded
    init_from: dict[str, str] = {}
    if settings.init_from:
        checkpoint, init_from = start_model(settings.init_from, tracking_uri, Path(settings.output_dir) / "init_model")
        data_lineage = {**(data_lineage or {}), **{f"init_from_{key}": value for key, value in init_from.items()}}
    config = resolve_run_config(
        training=settings,
        backbone=backbone,
        encode_template=FormatConfig.from_params(format_params).templates.single_turn(),
        tracking_uri=tracking_uri,
        experiment=mlflow["experiment"],
        checkpoint=checkpoint,
        conversations_dir=conversations_dir,
        shards_dir=shards_dir,
        stage=stage,
        parent_run_id=parent_run_id,
        cocoa=cocoa,
    )
    # lineage and the MLflow run's name, description and tags: not part of the resume fingerprint
    config["git_commit"] = source_commit()
    config["mlflow"] |= describe_run(config, settings, kedro_run, parent_run_id, data_lineage)
    launch_training(config)
    output_dir = Path(settings.output_dir)
    history = read_metrics(output_dir / METRICS_FILE)
    run = json.loads((output_dir / RUN_FILE).read_text())
    identity = read_model_identity(output_dir / "model")
    if identity["mlflow_run_id"] != run["mlflow_run_id"]:
        raise ModelIdentityError(
            f"{output_dir / 'model'} holds the model of MLflow run {identity['mlflow_run_id']}, but this training "
            f"is run {run['mlflow_run_id']}"
        )
    tenth = max(1, len(history) // 10)
    record = {
        "mlflow_run_id": run["mlflow_run_id"],
        "tracking_uri": tracking_uri,
        "model_dir": str(output_dir / "model"),
        "model_content_hash": identity["content_hash"],
        "steps": int(history["step"].iloc[-1]),
        "loss_first_10pct": float(history["loss"].iloc[:tenth].mean()),
        "loss_last_10pct": float(history["loss"].iloc[-tenth:].mean()),
        "fingerprint": config["fingerprint"],
        # training.select: the step whose weights are the model, and why (training/heldout.py)
        "selected": json.loads((output_dir / SELECTION_FILE).read_text()),
    }
    if parent_run_id:
        record["parent_run_id"] = parent_run_id
    if init_from:
        record["init_from"] = init_from
    return record, history, loss_curve_figure(history)


def planned_steps(training: TrainingConfig, conversations_dir: Path, shards_dir: Path) -> int:
    """The optimizer steps a run of ``training`` takes on these conversations (read only without ``max_steps``)."""
    if training.max_steps:
        return training.max_steps
    batches = ConversationBatches.for_counting(
        conversations_dir,
        shards_dir,
        batch_size=training.micro_batch_size,
        world_size=training.world_size,
        hard_negatives=training.hard_negatives,
        heldout=training.during_training.heldout_conversations,
    )
    return training.total_steps(batches.steps_per_epoch)


def describe_run(
    config: dict[str, Any],
    training: TrainingConfig,
    kedro_run: dict[str, Any],
    parent_run_id: str | None = None,
    data_lineage: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The MLflow run's name (``training.run_name``), description, context tags and data fingerprint.

    The name's template fills in {stage} (stage0: `cocoa`, stage1: `train`, stage2: `finetune`),
    {checkpoint} (the backbone's folder name), {steps} (the optimizer steps the
    run takes: ``max_steps``, else epochs x full global batches of the
    conversations) and any setting by its dotted key; never the `kedro run
    --pipelines` list, which says how the run was started, not what it trains.
    A fine-tuning run names its stage-1 run in the description and in the tag
    ``muco_flow.parent_run_id`` (not mlflow.parentRunId: the two runs may be in different experiments).
    Each ``data_lineage`` entry becomes the tag ``muco_flow.<key>``.
    """
    values = {
        "training": training.to_dict(),
        "backbone": config["backbone"],
        "stage": STAGE_NAMES[config["stage"]],
        "checkpoint": Path(config["checkpoint"]).name,
        "steps": planned_steps(training, Path(config["conversations_dir"]), Path(config["shards_dir"])),
    }
    manifest = Path(config["shards_dir"]) / "manifest.json"
    fingerprint = canonical_hash(json.loads(manifest.read_text())) if manifest.is_file() else "missing"
    launcher = training.launcher
    length = f"{training.max_steps} steps" if training.max_steps else f"{training.epochs} epochs"
    description = (
        f"MuCo embedder trained from `{config['checkpoint']}` on `{config['shards_dir']}` "
        f"(data fingerprint {fingerprint[:12]}): {length}, learning rate {training.learning_rate}, "
        f"{training.micro_batch_size} conversations x {launcher.processes_per_node} processes "
        f"x {launcher.nodes} nodes per step, temperature {training.temperature}. "
        f"Started by `{kedro_run['command']}` at commit {config['git_commit']}."
    )
    if parent_run_id:
        description = f"Fine-tuned (MuCo stage 2) from the stage-1 model of run `{parent_run_id}`. " + description
    if config["stage"] == "cocoa":
        cocoa = config["cocoa"]
        description = (
            f"CoCoA stage 0 (docs/cocoa.md): {cocoa['warmup_steps']} warm-up and {cocoa['bridged_steps']} "
            "EOS-bridged reconstruction steps, no contrastive loss. " + description
        )
    tags = context_tags(
        source=kedro_run["command"],
        git_commit=config["git_commit"],
        pipeline=kedro_run["pipelines"],
        env=kedro_run["env"],
    )
    if parent_run_id:
        tags[PARENT_RUN_TAG] = parent_run_id
    tags |= {f"{TAG_NAMESPACE}.{key}": value for key, value in (data_lineage or {}).items()}
    return {
        "run_name": run_name(training.run_name or DEFAULT_RUN_NAME, values),
        "description": description,
        "tags": tags,
        "data_fingerprint": fingerprint,
    }
