"""THE scorer registry: one vocabulary of scorer names for `--reward` (ReFL), `--scorer` (`rayapp eval`,
`jobs/score_dataset.py`), `rayapp score --model`, `rayapp.load_score` and the Serve `scorer:` field.

Names and aliases match in any case (`imagereward`, `ImageReward-v1.0`, `clip`, ...) and resolve to one
canonical name. A registration names its factory as "module:function", imported on first use, so this module
imports nothing heavy (no torch): the Serve config validates names with it. Adding a scorer is one
`register(...)` call at the bottom plus the module that builds it.

Factory contract: `factory(name, path, *, device, dtype, tiny, seed, tokenizer, **options)` returns the
scorer in eval mode with the scoring path (`score`, `score_pairs`, `inference_rank`) and a differentiable one
(`reward(images_0_1, prompts)` or `forward_scores`). `path` is None for the published weights, else a local
file or directory (`load_score` fetches URIs first); `tiny` asks for random toy-size weights seeded by `seed`;
`options` are the keywords the registration lists.

Spec text, one grammar wherever a scorer is named by a string:
    NAME         a registered name or alias, any case: the published weights
    NAME:tiny    random toy-size weights (tests, offline demos); `tiny` alone is ImageReward:tiny
    PATH         a save_pretrained directory (one with scorer.json is the scorer it records, any other an
                 ImageReward directory) or an official ImageReward .pt
    URI          an ImageReward checkpoint anywhere rayapp.data.storage fetches from (s3://, hf://, https://, ...)
    OWNER/REPO   a Hugging Face repo (`OWNER/REPO/DIR`: a folder of it) that is not a local path: hf://OWNER/REPO
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY = "tiny"
SCORER_CONFIG = "scorer.json"  # {"scorer": name, ...} beside a saved non-ImageReward scorer's weights


@dataclass(frozen=True)
class Registration:
    """One scorer: its canonical name, the other names it answers to, and how to build it."""

    name: str
    factory: str  # "module:function" (see the module docstring)
    aliases: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # keyword options the factory takes beyond the common ones
    module: str | None = None  # the implementing module, for a factory that serves several scorers
    summary: str = ""


class UnknownScorerError(ValueError):
    """A name that no registration answers to; the message lists the known ones."""


_REGISTRY: dict[str, Registration] = {}
_NAMES: dict[str, str] = {}  # casefolded name or alias -> canonical name


def register(name: str, factory: str, *, aliases: tuple[str, ...] = (), options: tuple[str, ...] = (),
             module: str | None = None, summary: str = "") -> Registration:
    """Add a scorer; a name or alias that is already taken (in any case) is an error."""
    entry = Registration(name, factory, tuple(aliases), tuple(options), module, summary)
    for spelling in (name, *aliases):
        owner = _NAMES.get(spelling.casefold())
        if owner is not None:
            raise ValueError(f"scorer name {spelling!r} is already registered for {owner!r}")
        if ":" in spelling or spelling.casefold() == TINY:
            raise ValueError(f"scorer name {spelling!r}: ':' and 'tiny' belong to the spec grammar")
    _REGISTRY[name] = entry
    _NAMES.update({spelling.casefold(): name for spelling in (name, *aliases)})
    return entry


def available_scores() -> list[str]:
    """The canonical names, in registration order."""
    return list(_REGISTRY)


def describe_names() -> str:
    """The known names with their aliases, for error messages and help texts."""
    parts = []
    for entry in _REGISTRY.values():
        parts.append(f"{entry.name} (or {', '.join(entry.aliases)})" if entry.aliases else entry.name)
    return ", ".join(parts)


def unknown_message(name: str) -> str:
    """The one error text for a name no scorer answers to."""
    return f"unknown scorer {name!r}; available scores (any case): {describe_names()}"


def match(name: str) -> str | None:
    """The canonical name `name` stands for (any case, aliases too), or None."""
    return _NAMES.get(str(name).strip().casefold())


def canonical_name(name: str) -> str:
    """The canonical name `name` stands for; an unknown one raises UnknownScorerError listing the known ones."""
    known = match(name)
    if known is None:
        raise UnknownScorerError(unknown_message(name))
    return known


def registration(name: str) -> Registration:
    """The registration of `name` (any case, aliases too)."""
    return _REGISTRY[canonical_name(name)]


def saved_scorer(directory: str | os.PathLike) -> str | None:
    """The canonical name a `save_pretrained` directory records in scorer.json, or None when it has none."""
    config = Path(directory) / SCORER_CONFIG
    return canonical_name(json.loads(config.read_text())["scorer"]) if config.is_file() else None


@dataclass(frozen=True)
class ScorerRef:
    """A parsed spec: which scorer, and whose weights (published, tiny random ones, or a path / URI)."""

    name: str  # canonical
    source: str | None = None  # None: the published weights (or tiny ones); else a local path or a URI
    tiny: bool = False

    def to_string(self) -> str:
        """Spec text that parses back to this reference."""
        if self.tiny:
            return f"{self.name}:{TINY}"
        return self.source if self.source is not None else self.name


def parse_spec(text: str) -> ScorerRef:
    """Parse one spec (see the module docstring); an unknown name is an UnknownScorerError."""
    from rayapp.data import storage

    text = str(text).strip()
    if not text:
        raise ValueError("empty scorer spec")
    if text.casefold() == TINY:
        return ScorerRef("ImageReward", tiny=True)
    name, sep, variant = text.partition(":")
    known = match(name)
    if known is not None and (not sep or variant.strip().casefold() == TINY):
        return ScorerRef(known, tiny=bool(sep))
    if storage.is_uri(text):
        return ScorerRef("ImageReward", source=text)
    hub = storage.hub_uri(text)
    if hub is not None:
        return ScorerRef("ImageReward", source=hub)
    path = Path(text).expanduser()
    if path.exists():
        return ScorerRef((saved_scorer(path) if path.is_dir() else None) or "ImageReward", source=os.fspath(path))
    raise UnknownScorerError(f"{unknown_message(text)}; a spec may also be NAME:tiny, a saved scorer directory, "
                             f"an ImageReward .pt file, a hub repo owner/repo or a URI")


def _is_device(value: Any) -> bool:
    if type(value).__name__ == "device":  # torch.device, without importing torch here
        return True
    return isinstance(value, str) and (value in ("cpu", "mps") or value.startswith("cuda"))


def load_score(name: str = "CLIP", path: str | os.PathLike | None = None, *, device: Any = None, dtype: Any = None,
               config: str | None = None, seed: int = 0, tokenizer: Any = None, **options: Any):
    """Load any registered scorer in eval mode (`rayapp.load_score`).

    name: a registered name or alias, any case (`available_scores()`).
    path: a local file / directory or a URI (fetched into rayapp's cache) with the weights; None for the
      published ones. A device string here ("cpu", "cuda:0") is taken as the device, as in the reference's
      `load_score(name, device, download_root)`.
    config: "tiny" builds random toy-size weights seeded by `seed` (tests, offline demos).
    tokenizer: a tokenizer object, directory or hub name instead of the scorer's default.
    options: the registration's own keywords (ImageReward: download_root; the baselines, PickScore and HPS:
      download_root, weights, clip_model, blip_preset, architecture -- see rayapp.eval.baselines).
    device: default CUDA when available, else CPU. dtype: "float32" (default), "bfloat16", "float16".
    """
    entry = registration(name)
    if _is_device(path):
        device, path = path, None
    if config is not None and config != TINY:
        raise ValueError(f"unknown scorer config {config!r}; only {TINY!r} is built in")
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise TypeError(f"{entry.name} takes the options {sorted(entry.options)}, not {unknown}")
    if path is not None:
        from rayapp.data import storage

        path = storage.local_path(path) if storage.is_uri(path) else os.fspath(path)
    module, _, function = entry.factory.partition(":")
    factory = getattr(importlib.import_module(module), function)
    return factory(entry.name, path, device=device, dtype=dtype, tiny=config == TINY, seed=seed, tokenizer=tokenizer,
                   **{key: value for key, value in options.items() if value is not None})


def load(spec: ScorerRef | str, *, device: Any = None, dtype: Any = None, tokenizer: Any = None, seed: int = 0,
         **options: Any):
    """The scorer a spec (text or ScorerRef) names, through `load_score`."""
    ref = parse_spec(spec) if isinstance(spec, str) else spec
    return load_score(ref.name, ref.source, device=device, dtype=dtype, config=TINY if ref.tiny else None, seed=seed,
                      tokenizer=tokenizer, **options)


def random_tiny_reward_model(seed: int = 0, tokenizer: Any = None):
    """ImageReward:tiny: the tiny preset with random-but-fixed weights over the synthetic captions' words.

    Its preferences mean nothing; ReFL can still climb it, which is what the offline runs and tests show.
    """
    import torch

    from rayapp.data.synth import vocabulary
    from rayapp.model.loading import create_model
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    with torch.random.fork_rng(devices=[]):  # building must not move the caller's random stream
        return create_model("tiny", tokenizer=tokenizer or build_wordpiece_tokenizer(vocabulary()), seed=seed)


def _load_imagereward(name: str, path: str | None, *, device: Any, dtype: Any, tiny: bool, seed: int,
                      tokenizer: Any, download_root: str | None = None):
    """ImageReward's factory: the published model, a checkpoint (.pt or save_pretrained dir), or ImageReward:tiny."""
    if tiny:
        return random_tiny_reward_model(seed, tokenizer).ready_for_inference(device, dtype)
    from rayapp.model.loading import load as load_imagereward

    return load_imagereward(path if path is not None else "ImageReward-v1.0", device=device, dtype=dtype,
                            tokenizer=tokenizer, download_root=download_root)


_BASELINE_OPTIONS = ("download_root", "weights", "clip_model", "blip_preset", "architecture")

register("ImageReward", "rayapp.scorers:_load_imagereward", aliases=("ImageReward-v1.0",),
         options=("download_root",), summary="the ImageReward reward model (BLIP + MLP head), THUDM/ImageReward")
register("CLIP", "rayapp.eval.baselines:load_baseline", options=_BASELINE_OPTIONS,
         module="rayapp.eval.baselines.clip", summary="cosine of CLIP ViT-L/14 image and text embeddings")
register("BLIP", "rayapp.eval.baselines:load_baseline", options=_BASELINE_OPTIONS,
         module="rayapp.eval.baselines.blip", summary="BLIP's image-text contrastive cosine")
register("Aesthetic", "rayapp.eval.baselines:load_baseline", options=_BASELINE_OPTIONS,
         module="rayapp.eval.baselines.aesthetic",
         summary="LAION aesthetic predictor on the CLIP ViT-L/14 image embedding (ignores the prompt)")
register("PickScore", "rayapp.eval.baselines:load_baseline", aliases=("PickScore_v1",), options=_BASELINE_OPTIONS,
         module="rayapp.eval.baselines.pickscore",
         summary="PickScore_v1: logit_scale x cosine of a CLIP ViT-H/14 tuned on Pick-a-Pic (transformers CLIPModel)")
register("HPSv2", "rayapp.eval.baselines:load_baseline", aliases=("HPSv2.0", "HPS_v2"), options=_BASELINE_OPTIONS,
         module="rayapp.eval.baselines.hps",
         summary="Human Preference Score v2: cosine of an open_clip ViT-H-14 tuned on HPD v2 (HPS_v2_compressed.pt)")
register("HPSv2.1", "rayapp.eval.baselines:load_baseline", aliases=("HPS_v2.1",), options=_BASELINE_OPTIONS,
         module="rayapp.eval.baselines.hps",
         summary="Human Preference Score v2.1 (HPS_v2.1_compressed.pt), HPSv2's architecture and scoring")
