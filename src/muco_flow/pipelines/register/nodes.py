"""Nodes of the `register` pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from muco_flow.mining.lineage import version_lineage_tags
from muco_flow.registry.config import RegistryConfig
from muco_flow.registry.promotion import show_eligibility
from muco_flow.registry.registration import lineage_tags, register_model_version, version_description
from muco_flow.tracking import UNKNOWN_COMMIT, source_commit
from muco_flow.training.model_identity import verify_evaluated_model, verify_trained_model


def register_trained_model(
    train_run: dict[str, Any], evaluation_metrics: dict[str, Any], shards_dir: str, registry: dict[str, Any]
) -> dict[str, Any]:
    """Registers the trained model as a new version (alias `challenger`), tagged with its lineage.

    Only the model train_run.json names (same run, same content hash) with the
    evaluation of that very model: anything else is refused.
    """
    from mlflow.tracking import MlflowClient

    config = RegistryConfig.from_dict(registry)  # checked before the model or MLflow is reached
    run_id, tracking_uri = train_run["mlflow_run_id"], train_run["tracking_uri"]
    verify_evaluated_model(evaluation_metrics, verify_trained_model(train_run["model_dir"], train_run))
    run = MlflowClient(tracking_uri).get_run(run_id)
    trained_at = run.data.tags.get("mlflow.source.git.commit", UNKNOWN_COMMIT)
    manifest = json.loads((Path(shards_dir) / "manifest.json").read_text())
    tags = lineage_tags(
        run_id=run_id,
        run_params=run.data.params,
        git_commit=trained_at if trained_at != UNKNOWN_COMMIT else source_commit(),
        data_manifest=manifest,
        training_fingerprint=train_run["fingerprint"],
        primary_metric=config.primary_metric,
        headline_metrics=evaluation_metrics["headline"],
    )
    # a model trained on mined negatives names how they were mined (the manifest's digest leads to the rest)
    tags |= version_lineage_tags(shards_dir)
    # a stage 1 started from another stage's model (training.init_from, e.g. CoCoA's stage 0): which weights
    tags |= {f"init_from_{key}": value for key, value in (train_run.get("init_from") or {}).items()}
    description = version_description(run_id, evaluation_metrics["headline"], evaluation_metrics["delta_vs_baseline"])
    parent_run_id = train_run.get("parent_run_id")
    if parent_run_id:  # a fine-tuned model (the `finetune` pipeline): its lineage is both runs
        tags["parent_run_id"] = parent_run_id
        description = (
            f"Fine-tuned (MuCo stage 2) in run `{run_id}` from the stage-1 model of run `{parent_run_id}`.\n\n"
            + description
        )
    registration = register_model_version(
        tracking_uri,
        name=config.model_name,
        run_id=run_id,
        model_dir=train_run["model_dir"],
        tags=tags,
        description=description,
        allow_older_challenger=config.allow_older_challenger,
        serving=config.serving,
    )
    # the gate, shown before anyone acts: the policy on the model, eligibility on every version
    show_eligibility(MlflowClient(tracking_uri), config.model_name, config.promotion_policy())
    return registration
