"""Which training run wrote a model directory, and whether its files are still the ones it wrote.

Training writes ``model_identity.json`` into the model directory before the
directory is renamed into place, so the weights and the identity appear
together or not at all. ``evaluate`` and ``register`` check it against
``train_run.json`` (the run they will attach results to) and ``metrics.json``
(the model that was scored): a model folder of another run, a model changed
after training, or an evaluation of another model is refused, never published
under the wrong lineage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the content hash lives with the data layer's file hashes, so that evaluation (below training) can name a model
from muco_flow.data.sources import MODEL_IDENTITY_FILE as IDENTITY_FILE
from muco_flow.data.sources import model_content_hash as content_hash


class ModelIdentityError(RuntimeError):
    """A model directory is not the model that train_run.json or metrics.json describes."""


def write_model_identity(directory: str | Path, *, mlflow_run_id: str, fingerprint: str) -> dict[str, str]:
    """Records the run and the content hash in ``directory`` (call it before the directory is moved into place)."""
    identity = {"mlflow_run_id": mlflow_run_id, "fingerprint": fingerprint, "content_hash": content_hash(directory)}
    (Path(directory) / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    return identity


def read_model_identity(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / IDENTITY_FILE
    try:
        identity = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelIdentityError(
            f"{directory} has no {IDENTITY_FILE}: it was not written by this muco-flow's training "
            "(re-run `kedro run --pipelines=train`)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelIdentityError(f"{path} is corrupt") from None
    if not isinstance(identity, dict) or not {"mlflow_run_id", "content_hash"} <= identity.keys():
        raise ModelIdentityError(f"{path} is corrupt (it needs mlflow_run_id and content_hash)")
    return identity


def verify_trained_model(directory: str | Path, train_run: dict[str, Any]) -> dict[str, str]:
    """The identity of ``directory`` after checking it is the model ``train_run`` (train_run.json) names.

    Checks, in order: the directory records the run train_run.json names
    (a rank 0 killed after writing the model but before train_run.json leaves
    a newer run's model under an older record); its files hash to what
    training recorded (nothing changed or damaged them since); and that hash
    is the one train_run.json recorded.
    """
    identity = read_model_identity(directory)
    run_id = train_run["mlflow_run_id"]
    if identity["mlflow_run_id"] != run_id:
        raise ModelIdentityError(
            f"{directory} holds the model of MLflow run {identity['mlflow_run_id']}, but train_run.json names "
            f"run {run_id} (a training stopped between writing the model and its record): re-run "
            "`kedro run --pipelines=train`, which resumes and finishes that run"
        )
    actual = content_hash(directory)
    if actual != identity["content_hash"]:
        raise ModelIdentityError(
            f"the files in {directory} changed after training wrote them (content hash {actual[:12]}, "
            f"recorded {identity['content_hash'][:12]}): re-run `kedro run --pipelines=train`"
        )
    recorded = train_run.get("model_content_hash")
    if recorded != actual:
        raise ModelIdentityError(
            f"train_run.json records model content hash {str(recorded)[:12]}, {directory} holds "
            f"{actual[:12]}: re-run `kedro run --pipelines=train`"
        )
    return {"mlflow_run_id": run_id, "content_hash": actual}


def verify_evaluated_model(metrics: dict[str, Any], identity: dict[str, str]) -> None:
    """Refuses a metrics.json that scored another model than ``identity`` (a stale or foreign evaluation)."""
    scored = metrics.get("scored_model") or {}
    if (
        scored.get("mlflow_run_id") != identity["mlflow_run_id"]
        or scored.get("content_hash") != identity["content_hash"]
    ):
        described = (
            f"run {scored.get('mlflow_run_id')}, content hash {str(scored.get('content_hash'))[:12]}"
            if scored
            else "no recorded model (an older evaluation)"
        )
        raise ModelIdentityError(
            f"metrics.json scored {described}, but the trained model is run {identity['mlflow_run_id']}, content "
            f"hash {identity['content_hash'][:12]}: run `kedro run --pipelines=evaluate` before registering"
        )
