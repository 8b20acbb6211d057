"""Kedro hooks: checks before any node loads data or a model; how a bad input ends a run; what a run ends with."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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
# The datasets a run's summary reads, as stage 1 names them; stage 2 (the
# `finetune` pipeline) writes the same under its namespace.
SUMMARY_STAGES = {"": "", "finetune.": "stage 2 "}

logger = logging.getLogger(__name__)


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


def run_summary(
    metrics: Mapping[str, Any] | None,
    registration: Mapping[str, Any] | None,
    *,
    report: str | None = None,
    run_url: str | None = None,
    label: str = "",
) -> list[str]:
    """The lines that end a run: score against the baseline, registered version, MLflow run, report, next commands.

    ``metrics`` is the evaluation's ``metrics.json``, ``registration`` the
    register node's record (either None when the run did not make it); a line
    is there only when what it states was made by this run. ``run_url``: the
    run's page on a tracking server. ``label`` starts each line (``stage 2 ``).
    """
    lines = []
    if metrics is not None:
        lines.append(f"{label}score: {_score(metrics['model'], metrics['baseline'])}")
    if registration is not None:
        lines.append(
            f"{label}registered: {registration['name']} version {registration['version']}, "
            f"alias {registration['alias']} ({registration['model_uri']})"
        )
    run_id = (registration or {}).get("run_id") or (metrics or {}).get("mlflow_run_id")
    if run_id:
        lines.append(f"{label}MLflow run: {run_id}" + (f" ({run_url})" if run_url else ""))
    if report:
        lines.append(f"{label}report: {report}")
    if registration is not None:
        by_alias = f"models:/{registration['name']}@{registration['alias']}"
        lines.append(
            f"{label}next: kedro run --pipelines=promote (champion if it beats the champion by the margin); "
            f"serve: mlflow models serve -m {by_alias} --env-manager local -p 5001"
        )
    elif metrics is not None:
        lines.append(f"{label}next: kedro run --pipelines=register, then promote")
    return lines


def _score(model: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    """MMEB-format average hit@1 and M-BEIR's averages, trained vs untrained; a ratio where the baseline is above 0."""
    trained, untrained = model["mmeb"]["average"], baseline["mmeb"]["average"]
    ratio = f" ({trained / untrained:.2f}x)" if untrained > 0 else ""
    text = f"MMEB-format average hit@1 {trained:.3f} trained vs {untrained:.3f} untrained{ratio}"
    if "mbeir" in model:
        local, global_ = model["mbeir"]["average"], baseline["mbeir"]["average"]
        text += (
            f"; M-BEIR R@5 local {local['local']:.3f} vs {global_['local']:.3f}, "
            f"global {local['global']:.3f} vs {global_['global']:.3f}"
        )
    return text


class RunSummary:
    """Ends a run that evaluated or registered a model with its answer (``run_summary``), logged, so also in log files.

    Reads what the run's nodes wrote (metrics.json, registration.json), never
    recomputes; a pipeline that made neither gets no summary.
    """

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], run_result: Any, pipeline: Any, catalog: Any) -> None:
        made = pipeline.all_outputs()
        for prefix, label in SUMMARY_STAGES.items():
            metrics_name, registration_name = f"{prefix}evaluation_metrics", f"{prefix}registration"
            if metrics_name not in made and registration_name not in made:
                continue
            metrics = catalog.load(metrics_name) if metrics_name in made else None
            registration = catalog.load(registration_name) if registration_name in made else None
            report_name = f"{prefix}evaluation_report"
            report = _file_of(catalog, report_name) if report_name in made else None
            run_id = (registration or {}).get("run_id") or (metrics or {}).get("mlflow_run_id")
            tracking_uri = catalog.load("train_run")["tracking_uri"] if run_id and catalog.exists("train_run") else None
            for line in run_summary(
                metrics, registration, report=report, run_url=run_page(tracking_uri, run_id), label=label
            ):
                logger.info(line)


def run_page(tracking_uri: str | None, run_id: str | None) -> str | None:
    """The run's page in the MLflow UI of an http(s) tracking server; None for a local store or no run."""
    if not tracking_uri or not run_id or urlparse(tracking_uri).scheme not in ("http", "https"):
        return None
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _file_of(catalog: Any, name: str) -> str:
    """Where dataset ``name`` writes, relative to the working directory when inside it."""
    path = Path(str(catalog[name]._filepath))  # kedro-datasets' file datasets keep it there
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
