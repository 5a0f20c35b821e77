"""ReFL's reward: one differentiable scorer or a weighted sum of several (`--reward imagereward:1.0,aesthetic:0.1`).

Every scorer rayapp ships has a differentiable path from images in [0,1] to scores, so each can carry a
gradient (all of them frozen):
- ImageReward: `model.reward(images_0_1, prompts)` (BLIP ViT + BERT cross-attention + MLP head);
- CLIP: cos(image, text) of CLIP ViT-L/14; BLIP: BLIP's ITC cosine; Aesthetic: the LAION MLP on the CLIP
  image embedding (the prompt is unused) -- each through `preprocess_tensor` then `forward_scores`.
The held-out evaluation scores PIL images through each scorer's `score_pairs` (the scoring path), with the
same weights. Scales differ (ImageReward: normalised, about -2..2; CLIP / BLIP: a cosine, about 0.1..0.4;
Aesthetic: about 1..10), so weights trade them off in their own units.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rayapp.model.images import preprocess_tensor

IMAGEREWARD_ALIASES = ("imagereward", "imagereward-v1.0")
TINY_RM = "tiny"  # the random-but-fixed tiny ImageReward (reward_seed)


@dataclass(frozen=True)
class RewardTerm:
    """One scorer of a reward: its source text and weight."""

    source: str
    weight: float


def parse_reward(text: str | None) -> list[RewardTerm]:
    """`SOURCE[:WEIGHT][,SOURCE[:WEIGHT]...]` -> terms; an existing path is one term even with commas or colons.

    SOURCE: imagereward / ImageReward-v1.0 (the published model), tiny (the random tiny RM), a baseline (CLIP,
    BLIP, Aesthetic, or NAME:tiny for random toy weights), an official .pt or a save_pretrained directory.
    WEIGHT: a float after the last colon (default 1).
    """
    if text is None or str(text).strip().lower() in ("", "none", "null"):
        return [RewardTerm(TINY_RM, 1.0)]
    text = str(text).strip()
    if Path(text).expanduser().exists():
        return [RewardTerm(text, 1.0)]
    terms = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"reward {text!r}: an empty term (a stray comma?)")
        source, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep:
            try:
                weight = float(tail)
                source = head.strip()
            except ValueError:
                pass  # "aesthetic:tiny" or a URI: the colon belongs to the source
        if not source:
            raise ValueError(f"reward {text!r}: term {part!r} has a weight but no scorer")
        terms.append(RewardTerm(source, weight))
    return terms


def absolute_reward_paths(text: str | None) -> str | None:
    """The reward spec with each term that is an existing local path made absolute (jobs run in a copy)."""
    if text is None:
        return None
    terms = parse_reward(text)
    if len(terms) == 1 and terms[0].source == str(text).strip():
        path = Path(text).expanduser()
        return os.fspath(path.resolve()) if path.exists() else text
    parts = []
    for term in terms:
        path = Path(term.source).expanduser()
        source = os.fspath(path.resolve()) if path.exists() else term.source
        parts.append(f"{source}:{term.weight:g}")
    return ",".join(parts)


def _baseline_name(source: str) -> tuple[str, str] | None:
    """(baseline name, "tiny" | "hub" | directory) when `source` names a baseline scorer, else None."""
    from rayapp.eval.baselines import match_baseline, saved_baseline

    name, _, variant = source.partition(":")
    known = match_baseline(name)
    if known is not None and variant in ("", "tiny"):
        return known, variant or "hub"
    path = Path(source).expanduser()
    if path.is_dir():
        saved = saved_baseline(path)
        if saved is not None:
            return saved, os.fspath(path)
    return None


def load_scorer(source: str, device: torch.device, *, reward_seed: int = 0, tokenizer=None):
    """The frozen scorer a reward term names (eval mode, fp32, on `device`)."""
    return _load_scorer(source, device, reward_seed, tokenizer).eval().requires_grad_(False)


def _load_scorer(source: str, device: torch.device, reward_seed: int, tokenizer):
    import rayapp

    if source.lower() == TINY_RM:
        return random_tiny_reward_model(reward_seed, tokenizer).to(device)
    baseline = _baseline_name(source)
    if baseline is not None:
        from rayapp.eval.baselines import load_score

        name, where = baseline
        if where == "tiny":
            return load_score(name, config="tiny", device=device, seed=reward_seed)
        if where == "hub":
            return load_score(name, device=device)
        return load_score(name, where, device=device)
    name = "ImageReward-v1.0" if source.lower() in IMAGEREWARD_ALIASES else source
    return rayapp.load(name, device=device, tokenizer=tokenizer)


def differentiable_scores(scorer, images_0_1: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Scores [B] with a graph back to the images: ImageReward's `reward`, a baseline's `forward_scores`."""
    if hasattr(scorer, "reward"):
        return scorer.reward(images_0_1, prompts)
    pixels = preprocess_tensor(images_0_1, scorer.image_size).to(device=scorer.device, dtype=scorer.dtype)
    input_ids, attention_mask = scorer.tokenize(prompts)
    return scorer.forward_scores(pixels, input_ids.to(scorer.device), attention_mask.to(scorer.device))


class WeightedReward:
    """sum_i weight_i x scorer_i: `reward` (differentiable, ReFL's objective) and `score_pairs` (PIL path)."""

    def __init__(self, scorers: list, weights: list[float], labels: list[str]):
        self.scorers, self.weights, self.labels = list(scorers), [float(w) for w in weights], list(labels)

    def reward(self, images_0_1: torch.Tensor, prompts: str | list[str]) -> torch.Tensor:
        """Weighted sum of the scorers' differentiable scores, float32 [B]."""
        prompts = [prompts] * images_0_1.shape[0] if isinstance(prompts, str) else list(prompts)
        total = None
        for scorer, weight in zip(self.scorers, self.weights):
            part = weight * differentiable_scores(scorer, images_0_1, prompts).float().to(images_0_1.device)
            total = part if total is None else total + part
        return total

    def score_pairs(self, prompts: list[str], images: list) -> list[float]:
        """Weighted sum of the scorers' scores of (prompt, PIL image) pairs."""
        per_scorer = [scorer.score_pairs(list(prompts), list(images)) for scorer in self.scorers]
        return [sum(w * s[i] for w, s in zip(self.weights, per_scorer)) for i in range(len(prompts))]

    def set_dtype(self, dtype) -> WeightedReward:
        for scorer in self.scorers:
            scorer.set_dtype(dtype)
        return self

    def eval(self) -> WeightedReward:
        for scorer in self.scorers:
            scorer.eval()
        return self

    def requires_grad_(self, flag: bool) -> WeightedReward:
        for scorer in self.scorers:
            scorer.requires_grad_(flag)
        return self

    def describe(self) -> str:
        return " + ".join(f"{w:g} x {label}" for w, label in zip(self.weights, self.labels))


def load_reward_model(cfg, device: torch.device, dtype: torch.dtype) -> WeightedReward:
    """The frozen reward of `cfg.reward` in the training dtype (encoders; heads stay fp32)."""
    terms = parse_reward(cfg.reward)
    scorers = [load_scorer(term.source, device, reward_seed=cfg.reward_seed, tokenizer=cfg.reward_tokenizer)
               for term in terms]
    reward = WeightedReward(scorers, [t.weight for t in terms], [t.source for t in terms])
    reward.set_dtype(dtype if dtype != torch.float32 else None)
    return reward.eval().requires_grad_(False)


def random_tiny_reward_model(seed: int, tokenizer=None):
    """The offline default RM: the tiny preset with random-but-fixed weights over the synthetic captions' words.

    Its preferences mean nothing; ReFL can still climb it, which is what the offline runs and tests show.
    """
    import rayapp
    from rayapp.data.synth import vocabulary
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    with torch.random.fork_rng(devices=[]):  # building must not move the caller's random stream
        return rayapp.create_model("tiny", tokenizer=tokenizer or build_wordpiece_tokenizer(vocabulary()),
                                   seed=seed)
