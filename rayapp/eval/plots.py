"""Figures (matplotlib, headless), written as PNG: the benchmarks' panels per scorer, and the helpers every
plot of the package uses."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> Path:
    """Write the figure as PNG (creating the folder) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def plot_best_vs_worst(records: list[dict], scores: dict[str, list[list[float]]], path: str | Path) -> None:
    """Table 3: per scorer, histograms of the scores of each prompt's human-best and human-worst images."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(scores), figsize=(4.5 * len(scores), 3.5), squeeze=False)
    for ax, (label, per_record) in zip(axes[0], scores.items()):
        best, worst = [], []
        for record, values in zip(records, per_record):
            ranking = record["ranking"]
            if min(ranking) == max(ranking):
                continue
            best += [v for v, r in zip(values, ranking) if r == min(ranking)]
            worst += [v for v, r in zip(values, ranking) if r == max(ranking)]
        ax.hist([best, worst], bins=20, label=["human best", "human worst"], alpha=0.8)
        ax.set_title(label)
        ax.set_xlabel("score")
        ax.legend()
    save_png(fig, path)


def plot_distributions(scores: dict[str, dict[str, dict[str, list[float]]]], path: str | Path) -> None:
    """Table 1: violins of each generator's image scores (scores[label][generator][prompt id]), a panel per scorer."""
    plt = pyplot()
    flat = {label: {model: [s for values in per_prompt.values() for s in values]
                    for model, per_prompt in per_model.items()}
            for label, per_model in scores.items()}
    width = max(4.0, 1.4 * max(len(per_model) for per_model in flat.values()))
    fig, axes = plt.subplots(1, len(flat), figsize=(width * len(flat), 4), squeeze=False)
    for ax, (label, per_model) in zip(axes[0], flat.items()):
        names = [m for m, v in per_model.items() if v]
        ax.violinplot([per_model[m] for m in names], showmeans=True, showextrema=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_ylabel(f"{label} score")
        ax.set_title(f"{label} score per generator")
    save_png(fig, path)


def plot_multi_reward(report: dict, path: str | Path) -> None:
    """The multi-reward table: a panel per scorer (their scales differ), a bar per generator with its std."""
    plt = pyplot()
    labels, models = list(report["results"]), report["models"]
    fig, axes = plt.subplots(1, len(labels), figsize=(max(4.0, 1.1 * len(models)) * len(labels), 3.8),
                             squeeze=False)
    for ax, label in zip(axes[0], labels):
        stats = report["results"][label]
        shown = [m for m in models if stats[m]["images"]]
        ax.bar(range(len(shown)), [stats[m]["mean"] for m in shown], yerr=[stats[m]["std"] for m in shown],
               capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right")
        ax.set_title(label)
        ax.set_ylabel("mean score (± std)")
    save_png(fig, path)
