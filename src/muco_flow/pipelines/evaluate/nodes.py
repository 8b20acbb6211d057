"""Nodes of the `evaluate` pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from muco_flow.data.conversations import FormatConfig, single_turn_template
from muco_flow.evaluation.datasets import read_m3t_heldout, read_mmeb
from muco_flow.evaluation.evaluate import EncodingCache, chance_mmeb_average, score_sets
from muco_flow.evaluation.mbeir import read_mbeir
from muco_flow.evaluation.report import compare, markdown_report, mmeb_bar_figure, recall_curve_table, recall_figure
from muco_flow.modeling.embedder import load_embedder


def load_evaluation_sets(data_root: str, params: dict[str, Any]) -> dict[str, Any]:
    """Reads (and checks) every configured set; paths are relative to ``data_root`` unless absolute."""
    root = Path(data_root)
    sets: dict[str, Any] = {"mmeb": [], "mbeir": None, "m3t": []}
    if mmeb := params.get("mmeb"):
        sets["mmeb"] = read_mmeb(root / mmeb["dir"], root / mmeb.get("image_root", "."), mmeb["meta_tasks"])
    if mbeir := params.get("mbeir"):
        options = {k: v for k, v in mbeir.items() if k not in ("root", "tasks")}
        sets["mbeir"] = read_mbeir(root / mbeir["root"], list(mbeir["tasks"]), **options)
    if m3t := params.get("m3t_heldout"):
        sets["m3t"] = read_m3t_heldout(root / m3t["meta_file"], root / m3t.get("image_root", "."))
    return sets


def _score(model_dir: str, sets: dict[str, Any], params: dict, format_params: dict) -> dict:
    template = single_turn_template(FormatConfig.from_params(format_params).templates)
    embedder, template = load_embedder(model_dir, default_template=template)
    cache = EncodingCache(embedder, template, params["batch_size"])
    return score_sets(sets["mmeb"], sets["mbeir"], sets["m3t"], cache)


def evaluate_trained_model(
    sets: dict[str, Any], train_run: dict[str, Any], params: dict, format_params: dict
) -> dict[str, Any]:
    """All metrics for the model the `train` pipeline wrote."""
    return _score(train_run["model_dir"], sets, params, format_params)


def evaluate_baseline(
    sets: dict[str, Any], backbone_checkpoint: str, params: dict, format_params: dict
) -> dict[str, Any]:
    """All metrics for the baseline: the untrained backbone, or the model directory in ``baseline``."""
    source = params.get("baseline", "backbone")
    return _score(backbone_checkpoint if source == "backbone" else source, sets, params, format_params)


def build_evaluation_report(
    model: dict[str, Any],
    baseline: dict[str, Any],
    sets: dict[str, Any],
    train_run: dict[str, Any],
    params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, Any, Any, str]:
    """metrics.json, the recall@k table, two plots and the Markdown report."""
    chance = chance_mmeb_average(sets["mmeb"]) if sets["mmeb"] else 0.0
    metrics = compare(model, baseline, chance) | {"mlflow_run_id": train_run["mlflow_run_id"]}
    curves = recall_curve_table(model, baseline)
    report = markdown_report(metrics, train_run["model_dir"], params.get("baseline", "backbone"))
    return metrics, curves, mmeb_bar_figure(model, baseline, chance), recall_figure(curves), report


def log_evaluation_to_mlflow(
    metrics: dict[str, Any], curves: pd.DataFrame, report: str, train_run: dict[str, Any]
) -> None:
    """Adds the evaluation to the training run: eval/* metrics, plots, report and metrics.json."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(train_run["tracking_uri"])
    run_id = train_run["mlflow_run_id"]
    values = {f"eval/{k}": v for k, v in metrics["headline"].items()}
    values |= {f"eval_delta/{k}": v for k, v in metrics["delta_vs_baseline"].items()}
    client.log_batch(run_id, metrics=[Metric(k.replace("@", "_at_"), float(v), 0, 0) for k, v in values.items()])
    client.log_dict(run_id, metrics, "evaluation/metrics.json")
    client.log_text(run_id, report, "evaluation/report.md")
    # figures are rebuilt here: Kedro's MatplotlibDataset can save but not load them
    bars = mmeb_bar_figure(metrics["model"], metrics["baseline"], metrics["mmeb_chance_average"])
    client.log_figure(run_id, bars, "evaluation/mmeb_hit_at_1.png")
    client.log_figure(run_id, recall_figure(curves), "evaluation/recall_at_k.png")
    client.set_tag(run_id, "muco_flow.evaluated", "true")
