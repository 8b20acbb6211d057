from kedro.pipeline import Pipeline, node, pipeline

from muco_flow.hooks import MLFLOW_TAG
from muco_flow.pipelines.evaluate.nodes import (
    build_evaluation_report,
    evaluate_baseline,
    evaluate_trained_model,
    load_evaluation_sets,
    log_evaluation_to_mlflow,
    select_headline_metrics,
)


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(load_evaluation_sets, ["m3t_mini_snapshot", "params:evaluate"], "evaluation_sets",
                 name="load_evaluation_sets"),
            node(evaluate_trained_model,
                 ["evaluation_sets", "train_run", "params:evaluate", "params:format", "params:backbone"],
                 "trained_model_results", name="evaluate_trained_model"),
            node(evaluate_baseline,
                 ["evaluation_sets", "backbone_checkpoint", "params:evaluate", "params:format", "params:backbone"],
                 "baseline_results", name="evaluate_baseline"),
            node(
                build_evaluation_report,
                ["trained_model_results", "baseline_results", "evaluation_sets", "train_run", "params:evaluate"],
                ["evaluation_metrics", "recall_at_k", "mmeb_hit_at_1_plot", "recall_at_k_plot", "evaluation_report"],
                name="build_evaluation_report",
            ),
            node(select_headline_metrics, ["evaluation_metrics", "params:evaluate"], "headline_metrics",
                 name="select_headline_metrics"),
            node(
                log_evaluation_to_mlflow,
                ["evaluation_metrics", "recall_at_k", "evaluation_report", "train_run", "params:evaluate"],
                None,
                name="log_evaluation_to_mlflow",
                tags=[MLFLOW_TAG],
            ),
        ],
        namespace="evaluate",
        prefix_datasets_with_namespace=False,
    )  # fmt: skip
