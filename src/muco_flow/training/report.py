"""The training curve: read back from metrics.jsonl, and plotted."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def read_metrics(path: Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no training steps")
    return pd.DataFrame(rows).sort_values("step").reset_index(drop=True)


def loss_curve_figure(history: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_ax.plot(history["step"], history["loss"], color="0.75", linewidth=1, label="per step")
    window = max(1, len(history) // 20)
    loss_ax.plot(
        history["step"],
        history["loss"].rolling(window, min_periods=1).mean(),
        color="C0",
        linewidth=2,
        label=f"mean of {window}",
    )
    loss_ax.set(xlabel="step", ylabel="contrastive loss", title="MuCo training loss")
    loss_ax.legend()
    lr_ax.plot(history["step"], history["learning_rate"], color="C1")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="Schedule")
    figure.tight_layout()
    return figure
