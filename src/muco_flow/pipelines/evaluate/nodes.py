"""Nodes of the `evaluate` pipeline.

Each node takes the `evaluate` parameters as Kedro hands them (a dict) and
checks them (EvaluationConfig.from_dict) before anything else: a bad value
stops the run with an error naming its dotted key.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from muco_flow.evaluation.config import EvaluationConfig
from muco_flow.evaluation.ranks import score_on_ranks
from muco_flow.evaluation.report import (
    compare,
    dimension_figure,
    markdown_report,
    mmeb_bar_figure,
    recall_curve_table,
    recall_figure,
)
from muco_flow.evaluation.scoring import chance_mmeb_average, read_evaluation_sets, score_model
from muco_flow.tracking import metrics_table, select_metrics
from muco_flow.training.model_identity import content_hash, verify_trained_model


class SharedEvaluationSets(dict):
    """The evaluation sets, handed to every node that reads them as they are, not copied.

    Kedro's in-memory datasets deep-copy what they hand out; the sets are only
    read, and at M-BEIR's size a copy per reader would cost minutes. Under
    ParallelRunner they are still pickled to each process, as Kedro does.
    """

    def __deepcopy__(self, memo: dict) -> SharedEvaluationSets:
        return self


def load_evaluation_sets(data_root: str, params: dict[str, Any]) -> SharedEvaluationSets:
    """Reads (and checks) every configured set; paths are relative to ``data_root`` unless absolute."""
    return SharedEvaluationSets(read_evaluation_sets(data_root, EvaluationConfig.from_dict(params)))


def _score(model_dir: str, sets: dict[str, Any], config: EvaluationConfig, format_params: dict, backbone: dict) -> dict:
    """Every metric for one model: in this process, or on `evaluate.processes` ranks (pools split between them)."""
    if config.processes > 1:
        # each rank reads the sets itself, as this process did
        return score_on_ranks(model_dir, sets["data_root"], config, format_params, backbone)
    return score_model(model_dir, sets, config, format_params, backbone)


def evaluated_model_dir(train_run: dict[str, Any], model: str | None) -> str:
    """`evaluate.model` (``model``): null for the model the `train` pipeline wrote, or a model directory (a release)."""
    return model or train_run["model_dir"]


def scored_model(train_run: dict[str, Any], model: str | None) -> dict[str, str | None]:
    """Which model ``evaluate`` scores: its directory, MLflow run and content hash (metrics.json's `scored_model`).

    The model training wrote is checked against train_run.json (again, after
    scoring: a training that replaced the folder meanwhile is caught): a model
    folder of another run, or one changed since, is refused.
    """
    directory = evaluated_model_dir(train_run, model)
    if model:  # a release: it has no run of its own; the evaluation goes to train_run's
        return {"model_dir": directory, "mlflow_run_id": None, "content_hash": content_hash(directory)}
    return {"model_dir": directory, **verify_trained_model(directory, train_run)}


def evaluate_trained_model(
    sets: dict[str, Any], train_run: dict[str, Any], params: dict, format_params: dict, backbone: dict
) -> dict[str, Any]:
    """All metrics for the evaluated model: the one training wrote (checked first), or the directory in ``model``."""
    config = EvaluationConfig.from_dict(params)
    directory = evaluated_model_dir(train_run, config.model)
    if not config.model:
        verify_trained_model(directory, train_run)  # before any model is loaded
    return _score(directory, sets, config, format_params, backbone)


def evaluate_baseline(
    sets: dict[str, Any], backbone_checkpoint: str, params: dict, format_params: dict, backbone: dict
) -> dict[str, Any]:
    """All metrics for the baseline: the untrained backbone, or the model directory in ``baseline``."""
    config = EvaluationConfig.from_dict(params)
    source = backbone_checkpoint if config.baseline == "backbone" else config.baseline
    return _score(source, sets, config, format_params, backbone)


def build_evaluation_report(
    model: dict[str, Any],
    baseline: dict[str, Any],
    sets: dict[str, Any],
    train_run: dict[str, Any],
    params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, Any, Any, str]:
    """metrics.json, the recall@k table, two plots and the Markdown report."""
    config = EvaluationConfig.from_dict(params)
    chance = chance_mmeb_average(sets["mmeb"]) if sets["mmeb"] else 0.0
    metrics = compare(model, baseline, chance) | {
        "mlflow_run_id": train_run["mlflow_run_id"],
        # register refuses metrics.json unless this is the model it registers
        "scored_model": scored_model(train_run, config.model),
    }
    curves = recall_curve_table(model, baseline)
    report = markdown_report(metrics, evaluated_model_dir(train_run, config.model), config.baseline)
    return metrics, curves, mmeb_bar_figure(model, baseline, chance), recall_figure(curves), report


def select_headline_metrics(metrics: dict[str, Any], params: dict[str, Any]) -> dict[str, float]:
    """headline_metrics.json: the trained model's values of ``evaluate.dvc_metrics`` (DVC's metrics file)."""
    return select_metrics(metrics["headline"], EvaluationConfig.from_dict(params).dvc_metrics)


def log_evaluation_to_mlflow(
    metrics: dict[str, Any], curves: pd.DataFrame, report: str, train_run: dict[str, Any], params: dict[str, Any]
) -> None:
    """Adds the evaluation to the training run.

    Metrics: the headline values ``evaluate.mlflow_metrics`` names (eval/*) and their gain over the baseline
    (eval_delta/*); every value in the evaluation/results table; plots (with `evaluate.dimensions`, score
    against width too), report and metrics.json as artifacts.
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(train_run["tracking_uri"])
    run_id = train_run["mlflow_run_id"]
    chosen = select_metrics(metrics["headline"], EvaluationConfig.from_dict(params).mlflow_metrics)
    values = {f"eval/{k}": v for k, v in chosen.items()}
    values |= {f"eval_delta/{k}": metrics["delta_vs_baseline"][k] for k in chosen if k in metrics["delta_vs_baseline"]}
    client.log_batch(run_id, metrics=[Metric(k.replace("@", "_at_"), float(v), 0, 0) for k, v in values.items()])
    table = pd.DataFrame(metrics_table(metrics["headline"], metrics["delta_vs_baseline"]))
    client.log_table(run_id, table, "evaluation/results.json")
    client.log_dict(run_id, metrics, "evaluation/metrics.json")
    client.log_text(run_id, report, "evaluation/report.md")
    # figures are rebuilt here: Kedro's MatplotlibDataset can save but not load them
    bars = mmeb_bar_figure(metrics["model"], metrics["baseline"], metrics["mmeb_chance_average"])
    client.log_figure(run_id, bars, "evaluation/mmeb_hit_at_1.png")
    client.log_figure(run_id, recall_figure(curves), "evaluation/recall_at_k.png")
    if metrics["model"].get("dimensions"):  # evaluate.dimensions: score against width
        figure = dimension_figure(metrics["model"], metrics["baseline"])
        client.log_figure(run_id, figure, "evaluation/score_per_dimension.png")
    client.set_tag(run_id, "muco_flow.evaluated", "true")
