"""The paper's baseline scorers (CLIP, BLIP, Aesthetic) and the preference models reported beside ImageReward
(PickScore, HPSv2 / HPSv2.1), with ImageReward's call shapes.

Their names live in the one scorer registry (`rayapp.scorers`), which loads them through `load_baseline`; the
public loader is `rayapp.load_score("CLIP" | "BLIP" | "Aesthetic" | ...)`.
One module per scorer (`clip`, `blip`, `aesthetic`, `pickscore`, `hps`, named by its registration), each with
the same three constructors:
- `build_tiny(tokenizer)`: random toy-size weights, for tests and offline demos;
- `load_saved(meta, directory)`: the architecture of a directory written by `scorer.save_pretrained`;
- `load_real(RealWeights)`: the published weights (each module's docstring says where they come from).
A module may add `load_official(path, RealWeights)` for a path in its authors' own format (a transformers
directory for PickScore, an HPS `.pt` for HPSv2); a path with `scorer.json` is always a saved scorer.
One module may serve several names (`hps`: HPSv2 and HPSv2.1); the scorer carries the registry's name.

Unlike the reference (path-only inputs, one image at a time, fp32 only) every scorer takes any image
input kind (PIL / path / bytes / ndarray / tensor), batches, runs under inference_mode, and has a dtype.
Nothing heavy is imported until a scorer is loaded.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from rayapp.scorers import SCORER_CONFIG, load_score, registration, saved_scorer

from .download import RealWeights

# load_score is re-exported for the import path `from rayapp.eval.baselines import load_score`
__all__ = ["SCORER_CONFIG", "load_baseline", "load_score", "scorer_module"]


def scorer_module(name: str):
    """The module of a baseline: `build_tiny`, `load_saved`, `load_real` and its scorer class."""
    entry = registration(name)
    if entry.module is None:
        raise ValueError(f"{entry.name} is not a baseline scorer")
    return importlib.import_module(entry.module)


def _build_tiny(name: str, tokenizer: Any, seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        return scorer_module(name).build_tiny(tokenizer)


def _load_saved(name: str, directory: Path):
    from rayapp.model.checkpoint import load_state_strict, read_pretrained_state

    saved = saved_scorer(directory)
    if saved is None:
        raise FileNotFoundError(f"{directory} has no {SCORER_CONFIG}; save a scorer there with save_pretrained")
    if saved != name:
        raise ValueError(f"{directory} holds a {saved!r} scorer, not {name!r}")
    meta = json.loads((directory / SCORER_CONFIG).read_text())
    scorer = scorer_module(name).load_saved(meta, directory)
    load_state_strict(scorer, read_pretrained_state(directory), os.fspath(directory))
    return scorer


def _load_path(name: str, path: Path, source: RealWeights):
    """A saved scorer (scorer.json), else the module's official format when it reads one."""
    module = scorer_module(name)
    if saved_scorer(path) is None and hasattr(module, "load_official"):
        return module.load_official(path, source)
    return _load_saved(name, path)


def load_baseline(name: str, path: str | None, *, device: Any, dtype: Any, tiny: bool, seed: int, tokenizer: Any,
                  download_root: str | os.PathLike | None = None, weights: str | None = None,
                  clip_model: str | None = None, blip_preset: str = "imagereward-v1", architecture: Any = None):
    """The registry's factory for every baseline (see `rayapp.scorers`), in eval mode.

    tiny: random toy-size weights (seeded by `seed`). path: a directory written by `scorer.save_pretrained`.
    Otherwise the real weights (see each scorer module's docstring): CLIP / Aesthetic's CLIP from the hub
    repo `clip_model` (a hub name or a local transformers directory; default openai/clip-vit-large-patch14,
    PickScore's yuvalkirstain/PickScore_v1); BLIP / Aesthetic's file from the reference's URL, or `weights`
    (a local file, `hf://owner/repo/file` or a URL; HPS: its `.pt`); `blip_preset` names the encoder shapes of
    the BLIP file (the ViT-L/16 + BERT-base of "imagereward-v1" for model_large.pth); `architecture` the
    open_clip model of an HPS checkpoint (default ViT-H-14). `download_root` defaults to ~/.cache/ImageReward
    for URL files, the Hugging Face cache for hub files.
    """
    source = RealWeights(download_root=download_root, weights=weights, tokenizer=tokenizer,
                         clip_model=clip_model, blip_preset=blip_preset, architecture=architecture, scorer=name)
    if tiny:
        scorer = _build_tiny(name, tokenizer, seed)
    elif path is not None:
        scorer = _load_path(name, Path(path), source)
    else:
        scorer = scorer_module(name).load_real(source)
    scorer.name = name  # the registry's name: one class may serve several (HPSv2, HPSv2.1)
    return scorer.ready_for_inference(device, dtype)
