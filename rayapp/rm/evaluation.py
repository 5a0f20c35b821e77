"""Pairwise accuracy of a reward model on comparison pairs: one accumulator for validation inside training
(summed over ranks) and for held-out scoring of a saved model."""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

PAIR_KINDS = ("caption", "quality", "both", "human")


class PairAccuracy:
    """Counts pairs ordered right (model ties count as wrong) overall and per pair kind, plus a loss sum."""

    def __init__(self):
        # loss, pairs, correct, then (pairs, correct) per kind: a flat vector so ranks can all-reduce it
        self.sums = np.zeros(3 + 2 * len(PAIR_KINDS))

    def add(self, r_better: torch.Tensor, r_worse: torch.Tensor, kinds=None) -> None:
        """Add a batch of pair rewards; `kinds` is a sequence of pair-kind names (or None)."""
        correct = (r_better > r_worse).cpu().numpy()
        self.sums[0] += float(-torch.nn.functional.logsigmoid(r_better.float() - r_worse.float()).sum())
        self.sums[1] += len(correct)
        self.sums[2] += correct.sum()
        if kinds is not None:
            kinds = np.asarray(kinds)
            for k, kind in enumerate(PAIR_KINDS):
                selected = kinds == kind
                self.sums[3 + 2 * k] += selected.sum()
                self.sums[4 + 2 * k] += correct[selected].sum()

    def metrics(self, prefix: str = "val_") -> dict:
        """{prefix}loss, {prefix}acc, {prefix}pairs and {prefix}acc_<kind> for each kind present."""
        pairs = max(self.sums[1], 1.0)
        out = {f"{prefix}loss": self.sums[0] / pairs, f"{prefix}acc": self.sums[2] / pairs,
               f"{prefix}pairs": int(self.sums[1])}
        for k, kind in enumerate(PAIR_KINDS):
            if self.sums[3 + 2 * k]:
                out[f"{prefix}acc_{kind}"] = self.sums[4 + 2 * k] / self.sums[3 + 2 * k]
                out[f"{prefix}pairs_{kind}"] = int(self.sums[3 + 2 * k])
        return out


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
    """Share of unequal-rank pairs a saved model orders like the ranking, overall and per pair kind.

    Returns {"pairs", "accuracy", "pairs_<kind>", "accuracy_<kind>"} for every kind present. `use_ray` reads
    through the Ray Data pipeline (needs `tokenizer_dir`); otherwise pairs are decoded in this process.
    """
    batches = (_ray_batches(model, split_dir, tokenizer_dir, batch_size) if use_ray
               else _local_batches(model, split_dir, batch_size))
    tally = PairAccuracy()
    model.eval()
    for batch in batches:
        n = batch["pixels_better"].shape[0]
        rewards = model.score_batch(torch.cat([batch["pixels_better"], batch["pixels_worse"]]),
                                    batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1))
        tally.add(rewards[:n], rewards[n:], batch["pair_kind"])
    found = tally.metrics(prefix="")
    out = {"pairs": found["pairs"], "accuracy": found["acc"] if found["pairs"] else float("nan")}
    for kind in PAIR_KINDS:
        if f"acc_{kind}" in found:
            out[f"pairs_{kind}"], out[f"accuracy_{kind}"] = found[f"pairs_{kind}"], found[f"acc_{kind}"]
    return out
