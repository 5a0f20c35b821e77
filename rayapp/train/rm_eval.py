"""Held-out pairwise accuracy of a trained reward model on a Parquet comparison split."""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch


def _local_batches(model, split_dir, batch_size: int) -> Iterator[dict]:
    """Pairs decoded in this process with the scorer's own preprocessing (no Ray start-up cost)."""
    from rayapp.data.pairs import iter_pairs

    def flush(rows):
        ids, mask = model.tokenize([r["prompt"] for r in rows])
        return {"pixels_better": model.preprocess([r["image_better"] for r in rows]),
                "pixels_worse": model.preprocess([r["image_worse"] for r in rows]),
                "input_ids": ids, "attention_mask": mask, "pair_kind": [r["pair_kind"] for r in rows]}

    rows = []
    for pair in iter_pairs(split_dir):
        rows.append(pair)
        if len(rows) == batch_size:
            yield flush(rows)
            rows = []
    if rows:
        yield flush(rows)


def _ray_batches(model, split_dir, tokenizer_dir, batch_size: int) -> Iterator[dict]:
    """Pairs from the Ray Data pipeline (decode/preprocess on the cluster), for large splits."""
    from rayapp.data.pipeline import build_pair_dataset, torch_batches

    dataset = build_pair_dataset(split_dir, image_size=model.config.image_size, tokenizer_dir=tokenizer_dir,
                                 max_length=model.config.max_length)
    yield from torch_batches(dataset, batch_size)


def pairwise_accuracy(model, split_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                      batch_size: int = 64, use_ray: bool = False) -> dict:
    """Share of unequal-rank pairs the model orders like the ranking (model ties count as wrong), per kind.

    Returns {"pairs", "accuracy", "pairs_<kind>", "accuracy_<kind>"} for every pair kind present.
    `use_ray` reads through the Ray Data pipeline (needs `tokenizer_dir`); otherwise pairs are decoded here.
    """
    batches = (_ray_batches(model, split_dir, tokenizer_dir, batch_size) if use_ray
               else _local_batches(model, split_dir, batch_size))
    correct, kinds = [], []
    model.eval()
    for batch in batches:
        n = batch["pixels_better"].shape[0]
        rewards = model.score_batch(torch.cat([batch["pixels_better"], batch["pixels_worse"]]),
                                    batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1))
        correct.append((rewards[:n] > rewards[n:]).cpu().numpy())
        kinds.extend(batch["pair_kind"])
    correct_all = np.concatenate(correct) if correct else np.zeros(0, dtype=bool)
    kinds_all = np.asarray(kinds)
    out = {"pairs": int(correct_all.size),
           "accuracy": float(correct_all.mean()) if correct_all.size else float("nan")}
    for kind in sorted(set(kinds)):
        sel = kinds_all == kind
        out[f"pairs_{kind}"] = int(sel.sum())
        out[f"accuracy_{kind}"] = float(correct_all[sel].mean())
    return out
