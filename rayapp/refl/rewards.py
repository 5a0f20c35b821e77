"""ReFL's reward: one differentiable scorer or a weighted sum of several (`--reward imagereward:1.0,aesthetic:0.1`).

Each term is a spec of the one scorer registry (`rayapp.scorers`: names in any case, NAME:tiny, paths, URIs);
`load_reward_model` builds the reward once and returns it as a callable, `reward(images_0_1, prompts) -> [B]`.

Every scorer rayapp ships has a differentiable path from images in [0,1] to scores, so each can carry a
gradient (all of them frozen):
- ImageReward: `model.reward(images_0_1, prompts)` (BLIP ViT + BERT cross-attention + MLP head);
- CLIP: cos(image, text) of CLIP ViT-L/14; BLIP: BLIP's ITC cosine; Aesthetic: the LAION MLP on the CLIP
  image embedding (the prompt is unused); PickScore: logit_scale x cos of its CLIP ViT-H/14 -- each through
  `preprocess_tensor` then `forward_scores`;
- HPSv2 / HPSv2.1: cos of HPS's CLIP, through the scorer's own `preprocess_tensor` (resize longest side + pad,
  the transform its scoring path uses too).
The held-out evaluation scores PIL images through each scorer's `score_pairs` (the scoring path), with the
same weights. Scales differ (ImageReward: normalised, about -2..2; CLIP / BLIP / HPS: a cosine, about 0.1..0.4;
PickScore: about 15..25; Aesthetic: about 1..10), so weights trade them off in their own units. Each term's
value is reported beside the sum (`WeightedReward.term_scores`, the held-out `eval_reward/<term>` metrics).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rayapp import scorers
from rayapp.model.images import preprocess_tensor
from rayapp.scorers import random_tiny_reward_model  # noqa: F401 -- rayapp.refl.models exports it from here


@dataclass(frozen=True)
class RewardTerm:
    """One scorer of a reward: its source text and weight."""

    source: str
    weight: float


def parse_reward(text: str | None) -> list[RewardTerm]:
    """`SOURCE[:WEIGHT][,SOURCE[:WEIGHT]...]` -> terms; an existing path is one term even with commas or colons.

    SOURCE: a scorer spec of `rayapp.scorers` -- a name in any case (ImageReward / ImageReward-v1.0, CLIP,
    BLIP, Aesthetic, PickScore, HPSv2, HPSv2.1), NAME:tiny for random toy weights (`tiny` alone: the random
    tiny ImageReward), an official .pt, a save_pretrained directory or a URI. WEIGHT: a float after the last
    colon (default 1).
    """
    if text is None or str(text).strip().lower() in ("", "none", "null"):
        return [RewardTerm(scorers.TINY, 1.0)]
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
    """The reward spec with each term that is an existing local path made absolute (jobs run in a copy).

    Run on the driver: a term no scorer answers to fails here, with the registry's list of names, not later in
    a worker."""
    if text is None:
        return None
    terms = parse_reward(text)
    for term in terms:
        scorers.parse_spec(term.source)
    if len(terms) == 1 and terms[0].source == str(text).strip():
        path = Path(text).expanduser()
        return os.fspath(path.resolve()) if path.exists() else text
    parts = []
    for term in terms:
        path = Path(term.source).expanduser()
        source = os.fspath(path.resolve()) if path.exists() else term.source
        parts.append(f"{source}:{term.weight:g}")
    return ",".join(parts)


def load_scorer(source: str, device: torch.device, *, reward_seed: int = 0, tokenizer=None):
    """The frozen scorer a reward term names (eval mode, fp32, on `device`).

    `tokenizer` (ReFLConfig.reward_tokenizer) is a BERT tokenizer for ImageReward terms; the other scorers
    bring their own. `reward_seed` seeds NAME:tiny weights.
    """
    ref = scorers.parse_spec(source)
    own_tokenizer = tokenizer if ref.name == "ImageReward" else None
    return scorers.load(ref, device=device, seed=reward_seed, tokenizer=own_tokenizer).eval().requires_grad_(False)


def differentiable_scores(scorer, images_0_1: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Scores [B] with a graph back to the images: ImageReward's `reward`, a baseline's `forward_scores`."""
    if hasattr(scorer, "reward"):
        return scorer.reward(images_0_1, prompts)
    if hasattr(scorer, "preprocess_tensor"):  # a scorer with its own image transform (HPS: resize + pad)
        pixels = scorer.preprocess_tensor(images_0_1)
    else:
        pixels = preprocess_tensor(images_0_1, scorer.image_size)
    pixels = pixels.to(device=scorer.device, dtype=scorer.dtype)
    input_ids, attention_mask = scorer.tokenize(prompts)
    return scorer.forward_scores(pixels, input_ids.to(scorer.device), attention_mask.to(scorer.device))


def term_labels(models: list) -> list[str]:
    """One label per term: the scorer's registry name, numbered from the second use of the same name on."""
    labels: list[str] = []
    for model in models:
        name = str(getattr(model, "name", None) or "ImageReward")
        count = sum(1 for label in labels if label.split("#")[0] == name)
        labels.append(name if count == 0 else f"{name}#{count + 1}")
    return labels


class WeightedReward:
    """sum_i weight_i x scorer_i: `reward` (differentiable, ReFL's objective) and `score_pairs` (PIL path).

    `terms` names each scorer (`term_labels`); `last_terms` holds the mean unweighted value of each term in the
    last `reward` call, `score_terms` each term's scores of (prompt, PIL image) pairs.
    """

    def __init__(self, models: list, weights: list[float], labels: list[str]):
        self.scorers, self.weights, self.labels = list(models), [float(w) for w in weights], list(labels)
        self.terms = term_labels(self.scorers)
        self.last_terms: dict[str, float] = {}

    def __call__(self, images_0_1: torch.Tensor, prompts: str | list[str]) -> torch.Tensor:
        """The differentiable reward (`reward`): what the training step calls."""
        return self.reward(images_0_1, prompts)

    def reward(self, images_0_1: torch.Tensor, prompts: str | list[str]) -> torch.Tensor:
        """Weighted sum of the scorers' differentiable scores, float32 [B]."""
        prompts = [prompts] * images_0_1.shape[0] if isinstance(prompts, str) else list(prompts)
        total = None
        last = {}
        for scorer, weight, term in zip(self.scorers, self.weights, self.terms):
            value = differentiable_scores(scorer, images_0_1, prompts).float().to(images_0_1.device)
            last[term] = float(value.detach().mean())
            total = weight * value if total is None else total + weight * value
        self.last_terms = last
        return total

    def score_terms(self, prompts: list[str], images: list) -> dict[str, list[float]]:
        """Each term's (unweighted) scores of (prompt, PIL image) pairs, by term label."""
        return {term: scorer.score_pairs(list(prompts), list(images)) for term, scorer in zip(self.terms, self.scorers)}

    def combine(self, per_term: dict[str, list[float]]) -> list[float]:
        """The weighted sum of `score_terms`' values, per pair."""
        columns = [per_term[term] for term in self.terms]
        return [sum(w * column[i] for w, column in zip(self.weights, columns)) for i in range(len(columns[0]))]

    def score_pairs(self, prompts: list[str], images: list) -> list[float]:
        """Weighted sum of the scorers' scores of (prompt, PIL image) pairs."""
        return self.combine(self.score_terms(prompts, images))

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
    models = [load_scorer(term.source, device, reward_seed=cfg.reward_seed, tokenizer=cfg.reward_tokenizer)
              for term in terms]
    reward = WeightedReward(models, [t.weight for t in terms], [t.source for t in terms])
    reward.set_dtype(dtype if dtype != torch.float32 else None)
    return reward.eval().requires_grad_(False)
