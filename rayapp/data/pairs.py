"""Pair expansion: every two images of one prompt with unequal rank make one (better, worse) example."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

# pair_kind for records without the synthetic set's faithfulness / quality columns (real human data)
HUMAN_PAIR_KIND = "human"
PAIR_KINDS = ("caption", "quality", "both")


def pair_kind(record: dict, better: int, worse: int) -> str:
    """"caption" (equal quality, different faithfulness), "quality", "both", or "human" without labels."""
    faith, qual = record.get("faithfulness"), record.get("quality")
    if faith is None or qual is None:
        return HUMAN_PAIR_KIND
    same_faith = faith[better] == faith[worse]
    same_qual = qual[better] == qual[worse]
    if same_qual and not same_faith:
        return "caption"
    if same_faith and not same_qual:
        return "quality"
    return "both"


def pair_indices(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """(better, worse) image indices for every unequal-rank pair, in (i < j) order; lower rank = better."""
    pairs = []
    for i in range(len(ranking)):
        for j in range(i + 1, len(ranking)):
            if ranking[i] < ranking[j]:
                pairs.append((i, j))
            elif ranking[j] < ranking[i]:
                pairs.append((j, i))
    return pairs


def count_pairs(ranking: Sequence[int]) -> int:
    """How many unequal-rank pairs a ranking makes (ties give none)."""
    return len(pair_indices(ranking))


def expand_pairs(record: dict) -> list[dict]:
    """One dict per unequal-rank pair: id, prompt, better, worse (image indices), pair_kind."""
    return [
        {"id": record["id"], "prompt": record["prompt"], "better": b, "worse": w,
         "pair_kind": pair_kind(record, b, w)}
        for b, w in pair_indices(record["ranking"])
    ]


def iter_pairs(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the expanded pairs of a Parquet shard dir without Ray, each with `image_better` / `image_worse` bytes."""
    from rayapp.data.shards import iter_comparisons

    for record in iter_comparisons(path):
        for pair in expand_pairs(record):
            pair["image_better"] = record["images"][pair["better"]]
            pair["image_worse"] = record["images"][pair["worse"]]
            yield pair


def pair_stats(path: str | os.PathLike) -> dict:
    """Prompts, images, unequal-rank pairs, pairs per kind, tied pairs, and (when the shards have them) a
    histogram per rating column and images per classification, of a Parquet shard dir (path or URI).

    Reads no image bytes. Histograms map a rating value (None = missing) to its image count.
    """
    from rayapp.data.shards import RATING_COLUMNS, iter_comparisons

    stats = {"prompts": 0, "images": 0, "pairs": 0, "tied_pairs": 0, "kinds": {}, "ratings": {},
             "classification": {}}
    columns = ["id", "prompt", "ranking", "faithfulness", "quality", *RATING_COLUMNS, "classification"]
    for record in iter_comparisons(path, batch_size=1024, columns=columns):
        ranking = record["ranking"]
        stats["prompts"] += 1
        stats["images"] += len(ranking)
        pairs = expand_pairs(record)
        stats["pairs"] += len(pairs)
        stats["tied_pairs"] += len(ranking) * (len(ranking) - 1) // 2 - len(pairs)
        for pair in pairs:
            stats["kinds"][pair["pair_kind"]] = stats["kinds"].get(pair["pair_kind"], 0) + 1
        for name in RATING_COLUMNS:
            if record.get(name) is not None:
                histogram = stats["ratings"].setdefault(name, {})
                for value in record[name]:
                    histogram[value] = histogram.get(value, 0) + 1
        for label in record.get("classification") or ():
            stats["classification"][label] = stats["classification"].get(label, 0) + 1
    return stats
