"""Kedro hooks: checks that must pass before any node loads data or a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from muco_flow.tracking import check_tracking_server, relocate_project_store, resolve_tracking_uri

# Nodes that talk to MLflow carry this tag; a run that includes one checks
# the tracking server before anything else happens.
MLFLOW_TAG = "mlflow"
# A memory dataset: which `kedro run` this is (pipelines, environment, the
# command), for the MLflow run's name and context tags.
KEDRO_RUN = "kedro_run"


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
