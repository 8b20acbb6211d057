"""The model a training stage starts from: the previous stage's run's, a directory, or a registered version.

Stage 2 (`finetune.init_from`) starts from stage 1's model by default; stage 1 (`training.init_from`) from the
backbone unless it names a model, such as CoCoA's stage 0 (docs/cocoa.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class InitModelError(ValueError):
    """`finetune.init_from` or `training.init_from` does not name a model a stage can start from."""


def resolve_init_model(
    init_from: str | None,
    train_run: dict[str, Any] | None,
    tracking_uri: str,
    download_dir: str | Path,
    *,
    setting: str = "finetune.init_from",
) -> tuple[str, str | None]:
    """Returns (model directory, the MLflow run that made it, None if unknown).

    ``init_from``: None for the model of ``train_run`` (the `train` pipeline's
    record); a ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI,
    downloaded into ``download_dir``; or a model directory. ``setting`` is the
    parameter's dotted name, for the errors.
    """
    from muco_flow.modeling.embedder import EMBEDDER_FILE

    if init_from is None:
        if train_run is None:
            raise InitModelError(f"{setting} is null and there is no previous stage's run to start from")
        return train_run["model_dir"], train_run["mlflow_run_id"]
    if init_from.startswith("models:/"):
        return _download_registered(init_from, tracking_uri, Path(download_dir), EMBEDDER_FILE, setting)
    if not (Path(init_from) / "config.json").is_file():
        raise InitModelError(f"{setting} {init_from!r} is not a model directory (no config.json) nor a models:/ URI")
    return init_from, None


def start_model(init_from: str, tracking_uri: str, download_dir: Path) -> tuple[str, dict[str, str]]:
    """The model directory ``training.init_from`` names, and its lineage: the source, its run and content hash.

    Only a model a training stage wrote (with its model_identity.json), unchanged
    since: the lineage a run records must be the weights it starts from.
    """
    from muco_flow.training.model_identity import ModelIdentityError, content_hash, read_model_identity

    model_dir, _ = resolve_init_model(init_from, None, tracking_uri, download_dir, setting="training.init_from")
    identity = read_model_identity(model_dir)
    actual = content_hash(model_dir)
    if actual != identity["content_hash"]:
        raise ModelIdentityError(
            f"training.init_from {init_from!r}: its files changed after training wrote them (content hash "
            f"{actual[:12]}, recorded {identity['content_hash'][:12]})"
        )
    return model_dir, {"source": init_from, "run_id": identity["mlflow_run_id"], "content_hash": actual}


def _download_registered(
    uri: str, tracking_uri: str, download_dir: Path, marker: str, setting: str
) -> tuple[str, str | None]:
    import shutil

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    reference = uri.removeprefix("models:/")
    name, _, alias = reference.partition("@")
    number = ""
    if not alias:
        name, _, number = name.partition("/")
    if not name or not (alias or number):
        raise InitModelError(f"{setting} {uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    client = MlflowClient(tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as error:
        raise InitModelError(f"{setting} {uri!r} is not in the registry at {tracking_uri}: {error}") from error
    shutil.rmtree(download_dir, ignore_errors=True)
    # the version's own location, from this client: a models:/ URI would be resolved against MLflow's
    # global registry URI instead (./mlflow.db of the working directory unless MLFLOW_TRACKING_URI is set)
    location = client.get_model_version_download_uri(name, version.version)
    local = Path(mlflow.artifacts.download_artifacts(location, dst_path=str(download_dir), tracking_uri=tracking_uri))
    found = sorted(path.parent for path in local.rglob(marker))
    if not found:
        raise InitModelError(f"{setting} {uri!r} holds no {marker}: not a model registered by muco-flow")
    return str(found[0]), version.run_id
