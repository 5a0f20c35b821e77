"""The loss and accuracy curve of a reward-model training run."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def loss_accuracy_curve(reports: Sequence[dict], path: str | os.PathLike) -> Path:
    """Train / validation loss (left) and validation pairwise accuracy (right) against the update; a PNG."""
    from rayapp.eval.plots import pyplot, save_png

    plt = pyplot()
    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in reports if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        steps, values = series(key)
        if steps:
            loss_ax.plot(steps, values, style, label=key, markersize=4)
    loss_ax.set_xlabel("optimizer update")
    loss_ax.set_ylabel("Bradley-Terry loss")
    loss_ax.set_title("loss")
    steps, values = series("val_acc")
    if steps:
        acc_ax.plot(steps, values, "o-", label="val_acc", markersize=4)
    for key in sorted({k for r in reports for k in r if k.startswith("val_acc_")}):
        steps, values = series(key)
        acc_ax.plot(steps, values, ".--", label=key, alpha=0.7)
    acc_ax.set_xlabel("optimizer update")
    acc_ax.set_ylabel("pairwise accuracy")
    acc_ax.set_title("validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    return save_png(fig, path)
