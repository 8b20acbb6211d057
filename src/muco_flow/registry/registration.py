"""Registering the trained model: a pyfunc version with its lineage, alias `challenger`.

A registered version is the training run's merged Hugging Face directory wrapped
in `serving.MuCoEmbeddingModel`, logged as MLflow models-from-code
(``PYFUNC_MODEL_MODULE``). Its tags lead back to what made it (run, commit,
data, parameters, evaluation); its description shows the evaluation.
"""

from __future__ import annotations

import functools
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
from muco_flow.tracking import canonical_hash, retry_while_locked

logger = logging.getLogger(__name__)

# What the pyfunc needs at load time, pinned to the versions that trained it.
RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "peft", "pillow", "numpy",
                    "pandas", "requests", "tqdm")  # fmt: skip

# models-from-code: the file MLflow logs as the model and runs at load time
PYFUNC_MODEL_MODULE = "muco_flow.pyfunc_model"
# The logged model's name (its page in the experiment's Models tab)
MODEL_ARTIFACT_NAME = "embedding_model"


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


def log_pyfunc_model(
    client, run_id: str, model_dir: str, model_code: str, *, hidden_size: int, serving: dict[str, Any]
) -> str:
    """Logs the pyfunc of ``model_dir`` (models-from-code: ``model_code``) as a model of ``run_id``; returns its
    ``models:/<model_id>`` URI. ``serving``: its model_config, also logged as the run's parameters.

    What `mlflow.pyfunc.log_model` does, with one step between saving and
    uploading: MLflow writes into MLmodel the absolute paths of this machine
    (the models-from-code file, ``model_code_path``; where the artifacts came
    from, ``uri``), which then travel with every copy of the model. They are
    written relative (``model_code_path`` as the file's name, which is all
    MLflow reads back when it loads: pyfunc/model.py `_load_context_model_and_signature`),
    and the source ``uri`` is left out.
    """
    import tempfile

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Param
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    experiment_id = client.get_run(run_id).info.experiment_id
    logged = retry_while_locked(
        lambda: client.create_logged_model(experiment_id, name=MODEL_ARTIFACT_NAME, source_run_id=run_id)
    )
    try:
        with tempfile.TemporaryDirectory() as staging:
            local = Path(staging) / MODEL_ARTIFACT_NAME
            mlflow.pyfunc.save_model(
                path=str(local),
                # models-from-code: the model is this file's source, run at load time; nothing is pickled
                python_model=model_code,
                artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
                signature=model_signature(hidden_size),
                input_example=input_example(),
                model_config=serving,
                pip_requirements=pinned_requirements(),
                code_paths=[str(Path(muco_flow.__file__).parent)],  # the muco_flow package: the model's own code
                mlflow_model=Model(run_id=run_id, model_id=logged.model_id, model_uuid=logged.model_id),
            )
            without_local_paths(local)
            client.log_model_artifacts(logged.model_id, str(local))
        retry_while_locked(lambda: client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)]))
    except BaseException:
        retry_while_locked(lambda: client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED))
        raise
    retry_while_locked(lambda: client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY))
    try:  # as log_model does: the serving limits as the run's parameters, where its page shows them
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in serving.items()])
    except MlflowException as err:  # a later registration with other limits: the first ones stay
        logger.warning("the serving limits are not logged as parameters of run %s: %s", run_id, err)
    return f"models:/{logged.model_id}"


def without_local_paths(model_path: Path) -> None:
    """Rewrites the MLmodel in ``model_path`` without this machine's paths: see ``log_pyfunc_model``."""
    from mlflow.models import Model

    mlmodel = Model.load(str(model_path))
    pyfunc = mlmodel.flavors["python_function"]
    pyfunc["model_code_path"] = Path(pyfunc["model_code_path"]).name
    for artifact in pyfunc.get("artifacts", {}).values():
        artifact.pop("uri", None)
    mlmodel.save(str(model_path / "MLmodel"))


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
        with fluent_tracking_uri(tracking_uri):
            model_uri = log_pyfunc_model(
                client, run_id, model_dir, model_code.origin, hidden_size=hidden_size, serving=dict(serving or {})
            )
            version = retry_while_locked(lambda: mlflow.register_model(model_uri, name, tags=dict(tags)))
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
    number = version.version
    for key, value in tags.items():
        retry_while_locked(functools.partial(client.set_model_version_tag, name, number, key, value))
    if description:
        retry_while_locked(lambda: client.update_model_version(name, number, description=description))
    retry_while_locked(lambda: client.set_registered_model_alias(name, CHALLENGER, number))
    return {
        "name": name,
        "version": int(version.version),
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version.version}",
        "alias": CHALLENGER,
        "tags": dict(tags),
    }
