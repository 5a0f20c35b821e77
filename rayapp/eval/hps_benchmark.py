"""The HPS v2 benchmark protocol (`rayapp eval hps`): a generator's images of the benchmark prompts, scored
per style, reported as `hpsv2.evaluation.evaluate_benchmark` reports them.

Layout (the reference's): a prompts folder with `{style}.json` (a JSON list of prompts) and a generations folder
with one `{style}/` folder per style holding `{index:05d}.jpg` for prompt `index`; a prompt without its image is
left out. Each score is the scorer's score x 100 (HPS: 100 x cosine). Per style, the scores in prompt order
are cut into chunks of 80; `mean` is the mean of the chunk means and `std` their population std (numpy's
default, ddof=0): the reference's numbers. `average` is the mean of every score of every style.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
CHUNK = 80  # the reference's group size: the benchmark's 800 prompts per style make 10 groups
SCALE = 100.0


def benchmark_pairs(prompts_dir: str | Path, style_dir: str | Path, style: str) -> list[tuple[str, Path]]:
    """(prompt, image path) for each prompt of `{style}.json` whose `{index:05d}.jpg` exists, in prompt order."""
    meta = Path(prompts_dir) / f"{style}.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: the prompts folder needs one {{style}}.json per style")
    prompts = json.loads(meta.read_text())
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{meta}: expected a JSON list of prompt strings")
    return [(prompt, Path(style_dir) / f"{i:05d}.jpg") for i, prompt in enumerate(prompts)
            if (Path(style_dir) / f"{i:05d}.jpg").is_file()]


def benchmark_styles(generations: str | Path, styles: list[str] | None = None) -> list[str]:
    """The styles to score: `styles`, else every sub-folder of the generations folder (the reference's choice)."""
    root = Path(generations)
    if not root.is_dir():
        raise FileNotFoundError(f"generations folder {root} not found")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    chosen = list(styles) if styles else found
    missing = [s for s in chosen if s not in found]
    if missing or not chosen:
        raise FileNotFoundError(f"{root} needs a folder per style ({', '.join(HPS_STYLES)}); "
                                f"missing {missing or chosen}")
    return chosen


def style_statistics(scores: list[float]) -> dict[str, float]:
    """The reference's per-style numbers from the x100 scores in prompt order: mean and std of chunk means."""
    if not scores:
        return {"mean": math.nan, "std": math.nan, "images": 0}
    chunks = [scores[i:i + CHUNK] for i in range(0, len(scores), CHUNK)]
    means = [sum(c) / len(c) for c in chunks]
    mean = sum(means) / len(means)
    std = math.sqrt(sum((m - mean) ** 2 for m in means) / len(means))
    return {"mean": mean, "std": std, "images": len(scores)}


def run_hps_benchmark(scorer, prompts_dir: str | Path, generations: str | Path, *, styles: list[str] | None = None,
                      batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """Score every style's images with `scorer`; the report (per-style statistics and scores, the average)."""
    results: dict[str, Any] = {}
    every: list[float] = []
    for style in benchmark_styles(generations, styles):
        pairs = benchmark_pairs(prompts_dir, Path(generations) / style, style)
        raw = scorer.score_pairs([p for p, _ in pairs], [str(path) for _, path in pairs], batch_size=batch_size,
                                 progress=progress) if pairs else []
        scores = [SCALE * s for s in raw]
        every += scores
        results[style] = {**style_statistics(scores), "scores": scores}
    average = sum(every) / len(every) if every else math.nan
    return {"mode": "hps", "generations": str(generations), "prompts_dir": str(prompts_dir),
            "scorer": getattr(scorer, "name", "scorer"), "styles": results, "average": average}


def hps_markdown(report: dict) -> str:
    """Style | mean | std | images, then the average: the reference's printout as a table."""
    from rayapp.eval.tables import markdown_table

    rows = [[style, f"{r['mean']:.2f}", f"{r['std']:.4f}", str(r["images"])] for style, r in report["styles"].items()]
    rows.append(["Average", f"{report['average']:.2f}", "", str(sum(r["images"] for r in report["styles"].values()))])
    title = f"HPS v2 benchmark of {report['generations']} ({report['scorer']} x 100)\n"
    return title + "\n" + markdown_table(["Style", "mean", "std (of 80-prompt group means)", "images"], rows)
