"""Kedro hooks: checks that must pass before any node loads data or a model, and how a bad input ends a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import DatasetError

from muco_flow.data.meta_file import MetaFileError
from muco_flow.data.sources import SourceError
from muco_flow.tracking import check_tracking_server, relocate_project_store, resolve_tracking_uri

# Nodes that talk to MLflow carry this tag; a run that includes one checks
# the tracking server before anything else happens.
MLFLOW_TAG = "mlflow"
# A memory dataset: which `kedro run` this is (pipelines, environment, the
# command), for the MLflow run's name and context tags.
KEDRO_RUN = "kedro_run"
# A verdict on an input as a whole (a damaged meta file, a snapshot that
# cannot be read where it is said to be), not a bug: worth one line, not a traceback.
WHOLE_INPUT_ERRORS = (MetaFileError, SourceError)


class KedroRunContext:
    """Puts what `kedro run` was asked to do into the catalog as ``kedro_run``, for nodes that record it."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if KEDRO_RUN not in pipeline.inputs():
            return
        names = run_params.get("pipeline_names") or ["__default__"]
        command = "kedro run" + ("" if names == ["__default__"] else f" --pipelines={','.join(names)}")
        catalog[KEDRO_RUN] = {
            "pipelines": ",".join(names),
            "env": run_params.get("env") or "local",
            "command": command + (f" --env={run_params['env']}" if run_params.get("env") else ""),
            "project_path": run_params.get("project_path", "."),
        }


class TrackingServerCheck:
    """Fails a run that will log to MLflow at its very start if the tracking server does not answer.

    A training run that found out only after loading data and models, or an
    evaluation after scoring for an hour, would lose all of that.
    """

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if not any(MLFLOW_TAG in node.tags for node in pipeline.nodes):
            return
        uris = [resolve_tracking_uri(catalog.load("params:mlflow").get("tracking_uri"))]
        # evaluation (and registration) write to the server that the training run used
        if "train_run" in pipeline.inputs() and catalog.exists("train_run"):
            uris.append(catalog.load("train_run")["tracking_uri"])
        for uri in dict.fromkeys(uris):
            check_tracking_server(uri)


class MovedProjectStore:
    """Rewrites the artifact folders a moved or copied project's own MLflow store still names at the old place."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if not any(MLFLOW_TAG in node.tags for node in pipeline.nodes):
            return
        uri = resolve_tracking_uri(catalog.load("params:mlflow").get("tracking_uri"))
        relocate_project_store(uri, Path.cwd())  # where MLflow resolves sqlite:///mlflow.db and ./mlruns


def whole_input_failure_line(error: BaseException) -> str | None:
    """The one line that ends a run stopped by a whole-input error, or None if ``error`` is none.

    Kedro wraps an error raised while a dataset loads in its own DatasetError,
    once more naming the dataset, so the chain of causes is searched; the line
    is the outermost DatasetError's message (dataset name included) when
    there is one.
    """
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__
    verdict = next((e for e in chain if isinstance(e, WHOLE_INPUT_ERRORS)), None)
    if verdict is None:
        return None
    shown = next((e for e in chain if isinstance(e, DatasetError)), verdict)
    return "input error: " + " ".join(str(shown).splitlines())


class OneLineInputErrors:
    """Ends a run that an unreadable input stopped with one line naming the input and the problem.

    Nodes already turn what they find into SystemExit; this catches the same
    errors where no node can: while Kedro loads a dataset (a snapshot root
    that is a file, a meta file that is a folder of parquet parts, an S3 URI
    without a bucket). SystemExit prints its message and no traceback.
    """

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        line = whole_input_failure_line(error)
        if line is not None:
            raise SystemExit(line) from None
