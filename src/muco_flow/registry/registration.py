"""Registering the trained model: a pyfunc version with its lineage, alias `challenger`.

A registered version is the training run's merged Hugging Face directory wrapped
in `serving.MuCoEmbeddingModel`, logged as MLflow models-from-code
(``PYFUNC_MODEL_MODULE``). Its tags lead back to what made it (run, commit,
data, parameters, evaluation); its description shows the evaluation.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow

import muco_flow
from muco_flow.registry import CHALLENGER, RegistryError, version_by_alias
from muco_flow.registry.serving import (
    MODEL_DIR_ARTIFACT,
    ServingLimits,
    check_model_dir,
    input_example,
    model_signature,
)
from muco_flow.tracking import canonical_hash

logger = logging.getLogger(__name__)

# What the pyfunc needs at load time, pinned to the versions that trained it.
RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "peft", "pillow", "numpy",
                    "pandas", "requests", "tqdm")  # fmt: skip

# models-from-code: the file MLflow logs as the model and runs at load time
PYFUNC_MODEL_MODULE = "muco_flow.pyfunc_model"


def pinned_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in RUNTIME_PACKAGES]


# ---------------------------------------------------------------- lineage


PRIMARY_METRIC_TAG = "primary_metric"
PRIMARY_METRIC_VALUE_TAG = "primary_metric_value"


def lineage_tags(
    *, run_id: str, run_params: Mapping[str, str], git_commit: str, data_manifest: Mapping[str, Any],
    training_fingerprint: str, primary_metric: str, headline_metrics: Mapping[str, float],
) -> dict[str, str]:  # fmt: skip
    """The few tags a version carries (promotion reads the last two); the rest is in its description."""
    if primary_metric not in headline_metrics:
        raise RegistryError(f"registry.primary_metric {primary_metric!r} is not a key of metrics.json's headline")
    return {
        "run_id": run_id,
        "git_commit": git_commit,
        "data_fingerprint": canonical_hash(data_manifest),
        "params_hash": canonical_hash(dict(run_params)),
        "training_fingerprint": training_fingerprint,
        PRIMARY_METRIC_TAG: primary_metric,
        PRIMARY_METRIC_VALUE_TAG: repr(float(headline_metrics[primary_metric])),
    }


def version_description(run_id: str, headline: Mapping[str, float], delta: Mapping[str, float]) -> str:
    """Markdown for the version page: where it comes from and every headline metric against the baseline."""
    lines = [
        f"MuCo embedder from training run `{run_id}` (its page has the parameters, curves and the full "
        "evaluation). Input: records with `text` and an optional `image`; output: one L2-normalised vector each.",
        "",
        "| metric | trained | vs baseline |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {key} | {value:.4f} | {delta[key]:+.4f} |" if key in delta else f"| {key} | {value:.4f} | |"
              for key, value in headline.items()]  # fmt: skip
    return "\n".join(lines)


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """``uri`` for MLflow's fluent API (start_run, log_model, register_model) inside the block only.

    ``mlflow.set_tracking_uri`` is process-wide and also exports MLFLOW_TRACKING_URI
    to every later subprocess; both are put back as they were.
    """
    from mlflow.tracking import is_tracking_uri_set

    previous = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # mlflow unsets the URI on None; its annotation omits None
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported


def find_version_for_run(client, name: str, run_id: str):
    """The version of ``name`` made from ``run_id``, or None; more than one is an error."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if len(versions) > 1:
        numbers = ", ".join(sorted(v.version for v in versions))
        raise RegistryError(f"model '{name}' has several versions ({numbers}) from run {run_id}")
    return versions[0] if versions else None


def register_model_version(
    tracking_uri: str,
    *,
    name: str,
    run_id: str,
    model_dir: str,
    tags: Mapping[str, str],
    description: str = "",
    allow_older_challenger: bool = False,
    serving: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Logs the pyfunc to ``run_id`` and registers it under ``name`` with ``tags`` and alias `challenger`.

    Idempotent: a version already made from the run is reused, so a retry after a
    failure (or a second `kedro run`) never creates a duplicate. Reusing an older
    version than the current challenger (`register` with an older train_run.json)
    would move `challenger` back: refused unless ``allow_older_challenger``.
    ``serving``: the ServingLimits stored with a new version (its model_config).
    """
    from mlflow.tracking import MlflowClient

    check_model_dir(model_dir)
    ServingLimits.from_config(serving)  # refused here rather than when the model is served
    client = MlflowClient(tracking_uri)
    version = find_version_for_run(client, name, run_id)
    if version is None:
        model_code = importlib.util.find_spec(PYFUNC_MODEL_MODULE)
        if model_code is None or model_code.origin is None:
            raise RegistryError(f"no module {PYFUNC_MODEL_MODULE}: the model's code is not installed with muco_flow")
        config = json.loads((Path(model_dir) / "config.json").read_text())
        hidden_size = (config.get("text_config") or config)["hidden_size"]
        with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="embedding_model",
                # models-from-code: the model is this file's source, run at load time; nothing is pickled
                python_model=model_code.origin,
                artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
                signature=model_signature(hidden_size),
                input_example=input_example(),
                model_config=dict(serving or {}),
                pip_requirements=pinned_requirements(),
                code_paths=[str(Path(muco_flow.__file__).parent)],  # the muco_flow package: the model's own code
            )
        with fluent_tracking_uri(tracking_uri):
            version = mlflow.register_model(info.model_uri, name, tags=dict(tags))
        logger.info("registered %s version %s from run %s", name, version.version, run_id)
    else:
        logger.info("%s version %s already holds run %s; not registering again", name, version.version, run_id)
        current = version_by_alias(client, name, CHALLENGER)
        if current is not None and int(current.version) > int(version.version) and not allow_older_challenger:
            raise RegistryError(
                f"'{name}' challenger is version {current.version}; run {run_id} is the older version "
                f"{version.version}, and moving challenger back needs registry.allow_older_challenger: true "
                "(is data/06_models/train_run.json an older training's?)"
            )
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    if description:
        client.update_model_version(name, version.version, description=description)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return {
        "name": name,
        "version": int(version.version),
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version.version}",
        "alias": CHALLENGER,
        "tags": dict(tags),
    }
