"""Comparison with the baseline: metrics with deltas, plots, and a Markdown report."""

from __future__ import annotations

from typing import Any

import pandas as pd


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The flat numbers worth comparing across runs (and logging to MLflow)."""
    flat: dict[str, float] = {}
    if results["mmeb"]["average"] is not None:
        flat["mmeb/average"] = results["mmeb"]["average"]
        flat |= {f"mmeb/{task}": v for task, v in results["mmeb"]["meta_tasks"].items()}
        flat |= {f"mmeb/{name}": d["hit@1"] for name, d in results["mmeb"]["datasets"].items()}
    if results.get("mbeir"):
        flat |= {f"mbeir/{kind}/average": v for kind, v in results["mbeir"]["average"].items()}
        for kind, rows in results["mbeir"]["rows"].items():
            for task, row in rows.items():
                flat |= {f"mbeir/{kind}/{task}/{k}": v for k, v in row.items() if "@" in k}
    for name, values in results["m3t_heldout"].items():
        flat |= {f"m3t_heldout/{name}/{k}": v for k, v in values.items() if "@" in k}
    return flat | dimension_headline(results)


def dimension_headline(results: dict[str, Any]) -> dict[str, float]:
    """The per-width numbers (`evaluate.dimensions`): ``mmeb/average@<d>``, ``mmeb/<meta-task>@<d>``,
    ``mbeir/<pool>/average@<d>``, so that each sits beside its full-width metric."""
    flat: dict[str, float] = {}
    for dim, scored in (results.get("dimensions") or {}).items():
        if scored["mmeb"]["average"] is not None:
            flat[f"mmeb/average@{dim}"] = scored["mmeb"]["average"]
            flat |= {f"mmeb/{task}@{dim}": v for task, v in scored["mmeb"]["meta_tasks"].items()}
        if scored["mbeir"]:
            flat |= {f"mbeir/{kind}/average@{dim}": v for kind, v in scored["mbeir"]["average"].items()}
    return flat


def dimension_table(model: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """The report's per-width table: a row per width, the MMEB average and each M-BEIR pool's, with the baseline's."""
    dims = model.get("dimensions") or {}
    if not dims:
        return []
    ours, theirs = dimension_headline(model), dimension_headline(baseline)
    columns = sorted({key.rsplit("@", 1)[0] for key in ours if "average@" in key})
    lines = [
        "## Per dimension (each vector cut to its first d numbers, re-normalised)",
        "",
        "| d | " + " | ".join(f"{c} | baseline" for c in columns) + " |",
        "| ---: | " + " | ".join("---: | ---:" for _ in columns) + " |",
    ]
    for dim in dims:
        cells = [f"{ours[f'{c}@{dim}']:.3f} | " + _maybe(theirs.get(f"{c}@{dim}")) for c in columns]
        lines.append(f"| {dim} | " + " | ".join(cells) + " |")
    return [*lines, "", "The MLflow run holds the plot: evaluation/score_per_dimension.png.", ""]


def _maybe(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def compare(model: dict[str, Any], baseline: dict[str, Any], chance: float) -> dict[str, Any]:
    """metrics.json: both results, the model's headline numbers, and their deltas."""
    ours, theirs = headline(model), headline(baseline)
    return {
        "headline": ours,
        "delta_vs_baseline": {k: ours[k] - theirs[k] for k in ours if k in theirs},
        "mmeb_chance_average": chance,
        "model": model,
        "baseline": baseline,
    }


def recall_curve_table(model: dict[str, Any], baseline: dict[str, Any]) -> pd.DataFrame:
    """Long format (set, k, model, recall) for DVC plots and the recall@k figure."""
    rows = [
        {"set": name, "k": int(k), "model": label, "recall": value}
        for label, results in (("trained", model), ("baseline", baseline))
        for name, curve in results["recall_curves"].items()
        for k, value in curve.items()
    ]
    return pd.DataFrame(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mmeb_bar_figure(model: dict[str, Any], baseline: dict[str, Any], chance: float):
    plt = _pyplot()
    names = list(model["mmeb"]["datasets"])
    ours = [model["mmeb"]["datasets"][n]["hit@1"] for n in names]
    theirs = [baseline["mmeb"]["datasets"][n]["hit@1"] for n in names]
    figure, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], theirs, width=0.4, label="baseline", color="0.65")
    ax.bar([i + 0.2 for i in x], ours, width=0.4, label="trained", color="C0")
    ax.axhline(chance, color="C3", linestyle="--", linewidth=1, label=f"chance (avg {chance:.2f})")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set(
        ylabel="hit@1",
        ylim=(0, 1),
        title=f"MMEB-format hit@1: average {model['mmeb']['average']:.3f} (baseline {baseline['mmeb']['average']:.3f})",
    )
    ax.legend()
    figure.tight_layout()
    return figure


def dimension_figure(model: dict[str, Any], baseline: dict[str, Any]):
    """Score against width (log scale): the MMEB average and each M-BEIR pool's, trained solid, baseline dotted."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 4))
    dims = [int(d) for d in model.get("dimensions") or {}]
    for label, results, style in (("trained", model, "o-"), ("baseline", baseline, "o:")):
        flat = dimension_headline(results)
        names = sorted({key.rsplit("@", 1)[0] for key in flat if "average@" in key})
        for i, name in enumerate(names):
            points = [(d, flat[f"{name}@{d}"]) for d in dims if f"{name}@{d}" in flat]
            ax.plot(*zip(*points, strict=True), style, color=f"C{i}", label=f"{name} ({label})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set(xlabel="dimensions", ylabel="score", ylim=(0, 1.02), title="Score per embedding width (Matryoshka prefixes)")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def recall_figure(curves: pd.DataFrame):
    plt = _pyplot()
    sets = sorted(curves["set"].unique())
    figure, ax = plt.subplots(figsize=(7, 4.2))
    for i, name in enumerate(sets):
        for label, style in (("trained", "-"), ("baseline", ":")):
            part = curves[(curves["set"] == name) & (curves["model"] == label)].sort_values("k")
            # tab20: M-BEIR's rows (task x pool) and M3T's turn types make more sets than the 10 default colours
            ax.plot(part["k"], part["recall"], style, color=plt.get_cmap("tab20")(i % 20), label=f"{name} ({label})")
    ax.set(xlabel="k", ylabel="recall@k", ylim=(0, 1.02), title="Retrieval recall@k (solid: trained, dotted: baseline)")
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def markdown_report(metrics: dict[str, Any], model_name: str, baseline_name: str) -> str:
    model, baseline = metrics["model"], metrics["baseline"]
    lines = [
        "# muco-flow evaluation",
        "",
        f"Model: `{model_name}`  ",
        f"Baseline: `{baseline_name}`",
        "",
        "![MMEB-format hit@1](mmeb_hit_at_1.png)",
        "",
        "## MMEB format (hit@1)",
        "",
        "| dataset | meta-task | queries | trained | baseline | delta |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, d in model["mmeb"]["datasets"].items():
        b = baseline["mmeb"]["datasets"][name]["hit@1"]
        lines.append(
            f"| {name} | {d['meta_task']} | {d['queries']} | {d['hit@1']:.3f} | {b:.3f} | {d['hit@1'] - b:+.3f} |"
        )
    for task, value in model["mmeb"]["meta_tasks"].items():
        b = baseline["mmeb"]["meta_tasks"][task]
        lines.append(f"| **{task}** (mean) | | | {value:.3f} | {b:.3f} | {value - b:+.3f} |")
    avg, base_avg = model["mmeb"]["average"], baseline["mmeb"]["average"]
    lines += [
        f"| **MMEB average** | | | **{avg:.3f}** | {base_avg:.3f} | {avg - base_avg:+.3f} |",
        "",
        f"Chance (random ranking): {metrics['mmeb_chance_average']:.3f}. A tie goes to the correct candidate "
        "(VLM2Vec's hit@1); hit@1_strict counts it against.",
        "",
        "![recall@k](recall_at_k.png)",
        "",
    ]
    if model.get("mbeir"):
        lines += _mbeir_table(model["mbeir"], baseline["mbeir"])
    lines += dimension_table(model, baseline)
    lines += [
        "## Held-out M3T, per turn type",
        "",
        "| set | recall@1 | recall@5 | recall@10 | MRR@10 | baseline R@1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in model["m3t_heldout"].items():
        b = baseline["m3t_heldout"][name]["recall@1"]
        lines.append(
            f"| {name} | {v['recall@1']:.3f} | {v['recall@5']:.3f} | {v['recall@10']:.3f} | "
            f"{v['mrr@10']:.3f} | {b:.3f} |"
        )
    lines.append("")
    return "\n".join(lines)


def _mbeir_table(model: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """A row per task and pool kind with its own cut-offs, and the M-BEIR average per pool kind."""

    def recalls(row: dict[str, Any]) -> str:
        return ", ".join(f"R@{k.split('@')[1]} {v:.3f}" for k, v in row.items() if k.startswith("recall@"))

    lines = [
        "## M-BEIR (UniIR's recall@k: any positive in the top k)",
        "",
        "| task | task id | pool | queries | candidates | trained | baseline |",
        "| --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for kind, rows in model["rows"].items():
        for task, row in rows.items():
            lines.append(
                f"| {task} | {row['task_id']} | {kind}: {row['pool']} | {row['queries']} | {row['candidates']} | "
                f"{recalls(row)} | {recalls(baseline['rows'][kind][task])} |"
            )
    metrics = sorted(set(model["average_metrics"].values()), key=lambda m: int(m.split("@")[1]))
    for kind, value in model["average"].items():
        b = baseline["average"][kind]
        lines.append(f"| **M-BEIR average ({kind})** | | | | | **{value:.3f}** | {b:.3f} (delta {value - b:+.3f}) |")
    lines += [
        "",
        f"The average is the mean over tasks of each task's {' or '.join(metrics)}, as UniIR's tables report.",
    ]
    return [*lines, ""]
