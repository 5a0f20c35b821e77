"""Scoring the paper's benchmarks: every image of Table 3's comparisons or Table 1's generations.

The tables and plots are made from what these return (`rayapp.eval.tables`, `rayapp.eval.plots`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rayapp.eval.files import find_generations, is_json_data
from rayapp.eval.scorers import ScorerSpec, load_scorer

logger = logging.getLogger(__name__)


def score_comparisons(specs: list[ScorerSpec], records: list[dict], *, device: Any = None, dtype: Any = None,
                      tokenizer: Any = None, batch_size: int = 16,
                      progress: bool = True) -> dict[str, list[list[float]]]:
    """label -> per record, one score per image; scored in this process, one scorer at a time."""
    from tqdm.auto import tqdm

    scores = {}
    for spec in specs:
        scorer = load_scorer(spec, device=device, dtype=dtype, tokenizer=tokenizer)
        scores[spec.label] = [scorer.score(r["prompt"], list(r["images"]), batch_size=batch_size)
                              for r in tqdm(records, desc=spec.label, unit="prompt", disable=not progress)]
    return scores


def score_comparisons_ray(specs: list[ScorerSpec], data: str | Path, records: list[dict], *,
                          scores_dir: str | None = None, batch_size: int = 16, concurrency: int = 1,
                          num_gpus: float = 0.0, dtype: Any = None, tokenizer: Any = None,
                          progress: bool = True) -> dict[str, list[list[float]]]:
    """As `score_comparisons`, through the Ray Data batch job over the Parquet shards at `data`.

    The scored Parquet goes to `scores_dir` (resumable) or a temporary directory.
    """
    import tempfile

    from rayapp.eval.batch_scoring import ScoreJobConfig, read_scored, run_score_job

    if is_json_data(data):
        raise ValueError("--ray reads Parquet shards; convert JSON first with `rayapp data convert`")
    out = scores_dir or tempfile.mkdtemp(prefix="rayapp-table3-")
    config = ScoreJobConfig(input=str(data), output=out, scorers=[s.to_string() for s in specs],
                            input_format="comparison", key_column="id", batch_size=batch_size,
                            concurrency=concurrency, num_gpus=num_gpus, dtype=dtype, tokenizer=tokenizer,
                            drop_images=True, resume=True, progress=progress)
    logger.info(run_score_job(config).summary())
    table = read_scored(out, columns=["id", *[s.column for s in specs]])
    ids = table["id"].to_pylist()
    by_id = {s.label: dict(zip(ids, table[s.column].to_pylist())) for s in specs}
    return {s.label: [by_id[s.label][r["id"]] for r in records] for s in specs}


def score_generations(specs: list[ScorerSpec], prompts: list[dict], dirs: dict[str, Path], *, device: Any = None,
                      dtype: Any = None, tokenizer: Any = None, batch_size: int = 16,
                      progress: bool = True) -> dict[str, dict[str, dict[str, list[float]]]]:
    """label -> generator -> prompt id -> scores of that generator's images for the prompt.

    A prompt with no image in a generator's folder is left out of that generator (and logged).
    """
    from tqdm.auto import tqdm

    images = {model: {item["id"]: find_generations(folder, item["id"]) for item in prompts}
              for model, folder in dirs.items()}
    for model, found in images.items():
        missing = sum(not paths for paths in found.values())
        if missing:
            logger.warning("%s: no images for %d of %d prompts", model, missing, len(prompts))
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for spec in specs:
        scorer = load_scorer(spec, device=device, dtype=dtype, tokenizer=tokenizer)
        results[spec.label] = {
            model: {item["id"]: scorer.score(item["prompt"], found[item["id"]], batch_size=batch_size)
                    for item in tqdm(prompts, desc=f"{spec.label} / {model}", unit="prompt", disable=not progress)
                    if found[item["id"]]}
            for model, found in images.items()
        }
    return results
