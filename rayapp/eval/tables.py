"""Benchmark reports: scored records -> a report dict (what `--out` writes) and its Markdown tables.

Table 3: preference accuracy and Recall/Filter@K per scorer, beside the paper's figures.
Table 1: each generator's mean score and induced rank per scorer, with Spearman rho vs a human ranking.
"""
from __future__ import annotations

import math

from rayapp.eval.metrics import (
    PUBLISHED_PEER_ACCURACY,
    PUBLISHED_RECALL_FILTER,
    PUBLISHED_TABLE1,
    PUBLISHED_TABLE1_SPEARMAN,
    PUBLISHED_TABLE3_ACCURACY,
    preference_accuracy,
    recall_filter_at_k,
    table1,
)
from rayapp.eval.scorers import ScorerSpec

# The ImageRewardDB test split as released: the only set the paper's accuracy figures are comparable with.
STANDARD_TEST_PROMPTS, STANDARD_TEST_IMAGES = 466, 2720
PUBLISHED_K = (1, 2, 4)  # the K values the paper reports Recall/Filter@K for


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i else ":---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def published_key(label: str) -> str | None:
    """The paper's row a scorer label stands for ("ImageReward-ours" -> "ImageReward"), if any."""
    for key in PUBLISHED_TABLE3_ACCURACY:
        if label.lower().startswith(key.lower()):
            return key
    return None


# ------------------------------------------------------------------------------------------- Table 3
def table3_report(data: str, records: list[dict], specs: list[ScorerSpec], scores: dict[str, list[list[float]]],
                  ks: list[int]) -> dict:
    """Accuracy and Recall/Filter@K of each scorer over `records` (scores[label][i] = record i's scores)."""
    results = {}
    for spec in specs:
        pairs = [(r["ranking"], sc) for r, sc in zip(records, scores[spec.label])]
        published = published_key(spec.label)
        results[spec.label] = {
            "scorer": spec.to_string(),
            "accuracy": preference_accuracy(pairs).to_dict(),
            "recall_filter": recall_filter_at_k(pairs, ks).to_dict(),
            "published": {
                "accuracy": PUBLISHED_TABLE3_ACCURACY.get(published),
                **PUBLISHED_RECALL_FILTER.get(published, {}),
            } if published else None,
        }
    images = sum(len(r["images"]) for r in records)
    return {
        "mode": "table3", "data": str(data), "prompts": len(records), "images": images, "ks": ks,
        "results": results,
        "published_note": "paper values (%): ImageRewardDB test split (466 prompts, 6,399 pairs) for accuracy; "
                          "an unreleased 371-prompt x 8-image set for Recall/Filter@K",
        "published_peers_accuracy": PUBLISHED_PEER_ACCURACY,
        "standard_test_split": len(records) == STANDARD_TEST_PROMPTS and images == STANDARD_TEST_IMAGES,
        "scores": {label: {r["id"]: s for r, s in zip(records, sc)} for label, sc in scores.items()},
    }


def _published_at_k(name: str, kind: str, k: int) -> str:
    table = PUBLISHED_RECALL_FILTER.get(name, {}).get(kind, {})
    return f"{table[k]:.2f}" if k in PUBLISHED_K and k in table else "-"


def table3_markdown(report: dict) -> str:
    """Our Table 3, then the paper's for reference (with a warning when the sets are not comparable)."""
    ks = report["ks"]
    header = (["Scorer", "Acc (micro) %", "Acc (per-prompt) %", "pairs"]
              + [f"R@{k} %" for k in ks] + [f"F@{k} %" for k in ks] + ["published Acc %"])
    rows = []
    for label, res in report["results"].items():
        acc, rf = res["accuracy"], res["recall_filter"]
        pub = res["published"]["accuracy"] if res["published"] else None
        rows.append([label, _pct(acc["micro"]), _pct(acc["per_prompt"]), str(acc["pairs"])]
                    + [_pct(rf["recall"][str(k)]) for k in ks] + [_pct(rf["filter"][str(k)]) for k in ks]
                    + [f"{pub:.2f}" if pub is not None else "-"])
    published_rows = [[name, f"{acc:.2f}"] + [_published_at_k(name, "recall", k) for k in ks]
                      + [_published_at_k(name, "filter", k) for k in ks]
                      for name, acc in PUBLISHED_TABLE3_ACCURACY.items()]
    caveat = "" if report["standard_test_split"] else (
        " (this set is not the 466-prompt ImageRewardDB test split, so they are not comparable)")
    return "\n".join([
        f"Table 3 on {report['data']}: {report['prompts']} prompts, {report['images']} images\n",
        markdown_table(header, rows),
        f"\nFor reference, {report['published_note']}:{caveat}\n",
        markdown_table(["Published (paper)", "Acc %"] + [f"R@{k} %" for k in ks] + [f"F@{k} %" for k in ks],
                       published_rows),
    ])


# ------------------------------------------------------------------------------------------- Table 1
def table1_report(prompts: int, models: list[str], human: dict[str, float] | None,
                  scores: dict[str, dict[str, dict[str, list[float]]]]) -> dict:
    """Per scorer label: Table 1 metrics of the generators, plus every per-prompt score."""
    return {
        "mode": "table1", "prompts": prompts, "models": models, "human_ranking": human,
        "results": {label: {**table1(per_model, human).to_dict(), "per_prompt": per_model}
                    for label, per_model in scores.items()},
    }


def table1_markdown(report: dict) -> str:
    """Generators x (score, rank per scorer), the paper's scores and the human rank; then Spearman rho."""
    results, models, human = report["results"], report["models"], report["human_ranking"]
    has_published = any(m in PUBLISHED_TABLE1 for m in models)
    header = ["Model"] + [f"{label} score" for label in results] + [f"{label} rank" for label in results]
    header += ["published ImageReward score"] * has_published + ["human rank"] * bool(human)
    rows = []
    for model in models:
        row = [model] + [_num(res["scores"].get(model)) for res in results.values()]
        row += [_num(res["ranking"].get(model), 1) for res in results.values()]
        if has_published:
            row.append(_num(PUBLISHED_TABLE1.get(model)))
        if human:
            row.append(_num(human.get(model), 0) if model in human else "-")
        rows.append(row)
    lines = [f"Table 1: {report['prompts']} prompts, {len(models)} generators\n", markdown_table(header, rows)]
    if human:
        lines.append("")
        lines += [f"Spearman rho ({label} vs human ranking, {len(res['spearman_models'] or [])} models): "
                  f"{_num(res['spearman'], 3)}" for label, res in results.items()]
        lines.append("Published Spearman rho vs human ranking: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in PUBLISHED_TABLE1_SPEARMAN.items()))
    if has_published:
        lines.append("Published ImageReward scores (paper Table 1): "
                     + ", ".join(f"{k} {v:+.4f}" for k, v in PUBLISHED_TABLE1.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- multi-reward
def multi_reward_report(prompts: int, models: list[str],
                        scores: dict[str, dict[str, dict[str, list[float]]]]) -> dict:
    """Generators x scorers: each generator's mean and std over its images, and its rank, per scorer label."""
    results = {}
    for label, per_model in scores.items():
        stats = {}
        for model in models:
            values = [s for per_prompt in per_model.get(model, {}).values() for s in per_prompt]
            mean = sum(values) / len(values) if values else math.nan
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else math.nan
            stats[model] = {"mean": mean, "std": std, "images": len(values)}
        ranked = sorted((m for m in models if stats[m]["images"]), key=lambda m: -stats[m]["mean"])
        for rank, model in enumerate(ranked, start=1):
            stats[model]["rank"] = rank
        results[label] = stats
    return {"mode": "rewards", "prompts": prompts, "models": models, "results": results, "per_prompt": scores}


def multi_reward_markdown(report: dict) -> str:
    """One row per generator, one column per scorer: mean ± std (rank)."""
    labels, models = list(report["results"]), report["models"]
    rows = []
    for model in models:
        row = [model]
        for label in labels:
            stats = report["results"][label][model]
            row.append("-" if not stats["images"] else
                       f"{stats['mean']:.4f} ± {stats['std']:.4f} ({stats['rank']})")
        rows.append(row)
    return "\n".join([f"Rewards: {report['prompts']} prompts, {len(models)} generators x {len(labels)} scorers "
                      f"(mean ± std over images, rank)\n", markdown_table(["Model", *labels], rows)])
