"""The model a fine-tuning (MuCo stage 2) starts from: the stage-1 run's, a directory, or a registered version."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class InitModelError(ValueError):
    """`finetune.init_from` does not name a model that can be fine-tuned."""


def resolve_init_model(
    init_from: str | None, train_run: dict[str, Any], tracking_uri: str, download_dir: str | Path
) -> tuple[str, str | None]:
    """Returns (model directory, the MLflow run that made it, None if unknown).

    ``init_from``: None for the model of ``train_run`` (the `train` pipeline's
    record); a ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI,
    downloaded into ``download_dir``; or a model directory.
    """
    from muco_flow.modeling.embedder import EMBEDDER_FILE

    if init_from is None:
        return train_run["model_dir"], train_run["mlflow_run_id"]
    if init_from.startswith("models:/"):
        return _download_registered(init_from, tracking_uri, Path(download_dir), EMBEDDER_FILE)
    if not (Path(init_from) / "config.json").is_file():
        raise InitModelError(
            f"finetune.init_from {init_from!r} is not a model directory (no config.json) nor a models:/ URI"
        )
    return init_from, None


def _download_registered(uri: str, tracking_uri: str, download_dir: Path, marker: str) -> tuple[str, str | None]:
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
        raise InitModelError(f"finetune.init_from {uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    client = MlflowClient(tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as error:
        raise InitModelError(f"finetune.init_from {uri!r} is not in the registry at {tracking_uri}: {error}") from error
    shutil.rmtree(download_dir, ignore_errors=True)
    # the version's own location, from this client: a models:/ URI would be resolved against MLflow's
    # global registry URI instead (./mlflow.db of the working directory unless MLFLOW_TRACKING_URI is set)
    location = client.get_model_version_download_uri(name, version.version)
    local = Path(mlflow.artifacts.download_artifacts(location, dst_path=str(download_dir), tracking_uri=tracking_uri))
    found = sorted(path.parent for path in local.rglob(marker))
    if not found:
        raise InitModelError(f"finetune.init_from {uri!r} holds no {marker}: not a model registered by muco-flow")
    return str(found[0]), version.run_id
