"""Evaluation metrics of the paper, written out so that every tie and edge case is a stated choice.

Pure Python + numpy: no torch, no ray. Conventions used throughout:
- human rankings: lower = better (1 = best), ties allowed (ImageRewardDB convention);
- model scores: higher = better (ImageReward, CLIP, BLIP, Aesthetic all follow this).
Formulas are in docs/EVAL.md; each function's docstring states its tie handling.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

DEFAULT_KS = (1, 2, 4)


def _check_scores(scores: Sequence[float], ranking: Sequence[int] | None = None, where: str = "") -> list[float]:
    values = [float(s) for s in scores]
    if any(math.isnan(v) for v in values):
        raise ValueError(f"{where}NaN score among {values}; score every image before computing metrics")
    if ranking is not None and len(ranking) != len(values):
        raise ValueError(f"{where}{len(values)} scores for {len(ranking)} ranked images")
    return values


# --------------------------------------------------------------------------------------------- accuracy
@dataclass
class PromptAccuracy:
    correct: int  # unequal-rank pairs ordered as the humans ordered them (strictly)
    pairs: int  # unequal-rank pairs (human ties skipped)
    model_ties: int  # pairs among `pairs` where the scores were equal (counted wrong)


def prompt_accuracy(ranking: Sequence[int], scores: Sequence[float], where: str = "") -> PromptAccuracy:
    """Count one prompt's pairs: human ties skipped, model ties counted wrong (as the reference's test.py)."""
    values = _check_scores(scores, ranking, where)
    correct = pairs = ties = 0
    n = len(values)
    for i in range(n):
        for j in range(i + 1, n):
            if ranking[i] == ranking[j]:
                continue  # the humans expressed no preference
            pairs += 1
            better, worse = (i, j) if ranking[i] < ranking[j] else (j, i)
            if values[better] > values[worse]:
                correct += 1
            elif values[better] == values[worse]:
                ties += 1
    return PromptAccuracy(correct, pairs, ties)


@dataclass
class AccuracyResult:
    micro: float  # correct / pairs over all prompts (the paper's Table 3 number), NaN when no pairs
    per_prompt: float  # mean over prompts with >= 1 pair of that prompt's accuracy
    correct: int
    pairs: int
    model_ties: int
    prompts: int  # prompts with at least one unequal-rank pair
    prompts_skipped: int  # prompts whose images the humans ranked all equal (no pairs)

    def to_dict(self) -> dict:
        return asdict(self)


def preference_accuracy(records: Iterable[tuple[Sequence[int], Sequence[float]]]) -> AccuracyResult:
    """Accuracy over (ranking, scores) per prompt; micro over pairs and the per-prompt average."""
    correct = pairs = ties = prompts = skipped = 0
    per_prompt: list[float] = []
    for index, (ranking, scores) in enumerate(records):
        acc = prompt_accuracy(ranking, scores, where=f"record {index}: ")
        if acc.pairs == 0:
            skipped += 1
            continue
        prompts += 1
        correct += acc.correct
        pairs += acc.pairs
        ties += acc.model_ties
        per_prompt.append(acc.correct / acc.pairs)
    return AccuracyResult(
        micro=correct / pairs if pairs else float("nan"),
        per_prompt=sum(per_prompt) / len(per_prompt) if per_prompt else float("nan"),
        correct=correct,
        pairs=pairs,
        model_ties=ties,
        prompts=prompts,
        prompts_skipped=skipped,
    )


# ------------------------------------------------------------------------------------ Recall / Filter@K
def prob_in_top_k(scores: Sequence[float], index: int, k: int) -> float:
    """P(image `index` is among the K highest scores) when score ties are broken uniformly at random.

    With g = #scores strictly above s_i and e = #scores equal to s_i (i included), image i's position
    is uniform on g+1 .. g+e, so P = clip((K - g) / e, 0, 1). K >= n gives 1.
    """
    s = scores[index]
    above = sum(1 for v in scores if v > s)
    equal = sum(1 for v in scores if v == s)
    return min(1.0, max(0.0, (k - above) / equal))


def prob_in_bottom_k(scores: Sequence[float], index: int, k: int) -> float:
    """P(image `index` is among the K lowest scores), ties broken uniformly at random (mirror of top K)."""
    s = scores[index]
    below = sum(1 for v in scores if v < s)
    equal = sum(1 for v in scores if v == s)
    return min(1.0, max(0.0, (k - below) / equal))


@dataclass
class RecallFilterResult:
    recall: dict[int, float]  # K -> share of prompts whose human-best image is in the scorer's top K
    filter: dict[int, float]  # K -> share of prompts whose human-worst image is in the scorer's bottom K
    prompts: int  # prompts used (those where the humans did not rank every image equal)
    prompts_skipped: int  # prompts with fewer than 2 images or all-equal human ranks
    trivial: dict[int, int] = field(default_factory=dict)  # K -> prompts with n <= K candidates (always a hit)

    def to_dict(self) -> dict:
        return {
            "recall": {str(k): v for k, v in self.recall.items()},
            "filter": {str(k): v for k, v in self.filter.items()},
            "prompts": self.prompts,
            "prompts_skipped": self.prompts_skipped,
            "trivial": {str(k): v for k, v in self.trivial.items()},
        }


def recall_filter_at_k(
    records: Iterable[tuple[Sequence[int], Sequence[float]]], ks: Sequence[int] = DEFAULT_KS
) -> RecallFilterResult:
    """Recall@K and Filter@K from (human ranking, scores) per prompt.

    The human-best images are those with the minimal rank, the human-worst those with the maximal rank.
    Ties on either side are broken uniformly at random and the expected hit is counted:
    hit_R(K) = mean over human-best images b of P(b in the scorer's top K), likewise Filter with the
    human-worst images and the bottom K. A prompt with n <= K images is a certain hit (recorded in
    `trivial`). Prompts whose human ranks are all equal (or with < 2 images) carry no best/worst and
    are skipped. A constant scorer gets exactly min(K, n) / n on every prompt: the random baseline.
    """
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"K must be >= 1, got {ks}")
    recall_sum = {k: 0.0 for k in ks}
    filter_sum = {k: 0.0 for k in ks}
    trivial = {k: 0 for k in ks}
    used = skipped = 0
    for index, (ranking, scores) in enumerate(records):
        values = _check_scores(scores, ranking, where=f"record {index}: ")
        n = len(values)
        if n < 2 or min(ranking) == max(ranking):
            skipped += 1
            continue
        used += 1
        best = [i for i, r in enumerate(ranking) if r == min(ranking)]
        worst = [i for i, r in enumerate(ranking) if r == max(ranking)]
        for k in ks:
            if n <= k:
                trivial[k] += 1
            recall_sum[k] += sum(prob_in_top_k(values, b, k) for b in best) / len(best)
            filter_sum[k] += sum(prob_in_bottom_k(values, w, k) for w in worst) / len(worst)
    nan = float("nan")
    return RecallFilterResult(
        recall={k: recall_sum[k] / used if used else nan for k in ks},
        filter={k: filter_sum[k] / used if used else nan for k in ks},
        prompts=used,
        prompts_skipped=skipped,
        trivial=trivial,
    )


# ------------------------------------------------------------------------------- Table 1 aggregation
def average_ranks(values: Sequence[float], descending: bool = False) -> list[float]:
    """Fractional ranks (1 = first), ties get the mean of the positions they span."""
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=descending)
    ranks = [0.0] * len(values)
    pos = 0
    while pos < len(order):
        end = pos
        while end + 1 < len(order) and values[order[end + 1]] == values[order[pos]]:
            end += 1
        mean_rank = (pos + end) / 2.0 + 1.0
        for j in range(pos, end + 1):
            ranks[order[j]] = mean_rank
        pos = end + 1
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho with ties: Pearson correlation of the average ranks (NaN if < 2 items or a constant side)."""
    if len(a) != len(b):
        raise ValueError(f"spearman_rho: {len(a)} vs {len(b)} values")
    if len(a) < 2:
        return float("nan")
    return _pearson(average_ranks(a), average_ranks(b))


@dataclass
class Table1Result:
    scores: dict[str, float]  # model -> mean over prompts of the mean score of that prompt's images
    ranking: dict[str, float]  # model -> rank induced by the scores (1 = best; ties share the average rank)
    prompts: dict[str, int]  # model -> prompts that had at least one image
    images: dict[str, int]
    spearman: float | None = None  # vs the human ranking, over the models present in both
    spearman_models: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def table1(
    per_model: Mapping[str, Mapping[str, Sequence[float]]],
    human_ranking: Mapping[str, float] | None = None,
) -> Table1Result:
    """Table-1 aggregation: `per_model[model][prompt_id] = [scores of that prompt's images]`.

    A model's score is the mean over prompts of the per-prompt mean (prompts with no images are left
    out of that model's mean). The induced ranking sorts by score, highest first. With a human ranking
    (model -> rank, 1 = best, ties allowed), Spearman's rho compares ranks over the common models.
    """
    scores: dict[str, float] = {}
    prompts: dict[str, int] = {}
    images: dict[str, int] = {}
    for model, by_prompt in per_model.items():
        means = []
        count = 0
        for pid, values in by_prompt.items():
            values = _check_scores(values, where=f"{model}/{pid}: ")
            if values:
                means.append(sum(values) / len(values))
                count += len(values)
        if not means:
            raise ValueError(f"model {model!r} has no scored images")
        scores[model] = sum(means) / len(means)
        prompts[model] = len(means)
        images[model] = count
    names = list(scores)
    ranks = average_ranks([scores[m] for m in names], descending=True)
    result = Table1Result(scores, dict(zip(names, ranks)), prompts, images)
    if human_ranking:
        common = [m for m in names if m in human_ranking]
        # higher score = better, lower human rank = better: correlate score with -rank.
        rho = spearman_rho([scores[m] for m in common], [-float(human_ranking[m]) for m in common])
        result.spearman = None if math.isnan(rho) else rho
        result.spearman_models = common
    return result


# ------------------------------------------------------------------------------ published numbers
# SPEC 4: the paper's figures, printed beside ours when the standard sets are evaluated.
PUBLISHED_TABLE3_ACCURACY = {"ImageReward": 65.14, "BLIP": 57.76, "Aesthetic": 57.35, "CLIP": 54.82}
PUBLISHED_RECALL_FILTER = {
    "ImageReward": {"recall": {1: 39.62, 2: 63.07, 4: 90.84}, "filter": {1: 49.06, 2: 70.89, 4: 88.95}},
    "CLIP": {"recall": {1: 27.22, 2: 48.52, 4: 78.17}, "filter": {1: 29.65, 2: 51.75, 4: 76.82}},
}
PUBLISHED_PEER_ACCURACY = {"HPS v2.1": 66.8, "MPS": 67.5, "PickScore": "61.6-62.9", "HPS v2": 65.7}
# Table 1: ImageReward score per generator, listed in the human ranking order (1 = best).
PUBLISHED_TABLE1 = {
    "openjourney": 0.2614,
    "sd2-1": 0.2458,
    "dalle2": 0.2114,
    "sd1-4": 0.1344,
    "vd": -0.2470,
    "cogview2": -1.2376,
}
PUBLISHED_TABLE1_HUMAN_RANKING = {name: i + 1 for i, name in enumerate(PUBLISHED_TABLE1)}
PUBLISHED_TABLE1_SPEARMAN = {"ImageReward": 1.00, "CLIP": 0.60}
