"""The paper's baseline scorers, with ImageReward's call shapes: `load_score("CLIP" | "BLIP" | "Aesthetic")`.

One module per scorer (`clip`, `blip`, `aesthetic`), each with the same three constructors:
- `build_tiny(tokenizer)`: random toy-size weights, for tests and offline demos;
- `load_saved(meta, directory)`: the architecture of a directory written by `scorer.save_pretrained`;
- `load_real(RealWeights)`: the published weights (each module's docstring says where they come from).
`BASELINES` maps each name to its module; this is the one list of baseline names in rayapp.

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

from .download import CLIP_HUB_REPO, RealWeights

BASELINES = {
    "CLIP": "rayapp.eval.baselines.clip",
    "BLIP": "rayapp.eval.baselines.blip",
    "Aesthetic": "rayapp.eval.baselines.aesthetic",
}
SCORER_CONFIG = "scorer.json"  # {"scorer": name, ...the scorer's config_dict()} beside model.safetensors


def available_scores() -> list[str]:
    """Names accepted by `load_score`."""
    return list(BASELINES)


def match_baseline(name: str) -> str | None:
    """The registered spelling of a baseline name (case-insensitive), or None when it is not one."""
    for known in BASELINES:
        if name.lower() == known.lower():
            return known
    return None


def canonical_name(name: str) -> str:
    """The registered spelling of a baseline name; an unknown name is an error listing the known ones."""
    known = match_baseline(name)
    if known is None:
        raise ValueError(f"Score {name!r} not found; available scores = {available_scores()}")
    return known


def saved_baseline(directory: str | os.PathLike) -> str | None:
    """The baseline name a `save_pretrained` directory records in scorer.json, or None when it has none."""
    config = Path(directory) / SCORER_CONFIG
    return json.loads(config.read_text())["scorer"] if config.is_file() else None


def scorer_module(name: str):
    """The module of a baseline: `build_tiny`, `load_saved`, `load_real` and its scorer class."""
    return importlib.import_module(BASELINES[canonical_name(name)])


def _build_tiny(name: str, tokenizer: Any, seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        return scorer_module(name).build_tiny(tokenizer)


def _load_saved(name: str, directory: Path):
    from rayapp.model.checkpoint import load_state_strict, read_pretrained_state

    saved = saved_baseline(directory)
    if saved is None:
        raise FileNotFoundError(f"{directory} has no {SCORER_CONFIG}; save a scorer there with save_pretrained")
    if saved != name:
        raise ValueError(f"{directory} holds a {saved!r} scorer, not {name!r}")
    meta = json.loads((directory / SCORER_CONFIG).read_text())
    scorer = scorer_module(name).load_saved(meta, directory)
    load_state_strict(scorer, read_pretrained_state(directory), os.fspath(directory))
    return scorer


def load_score(
    name: str = "CLIP",
    path: str | os.PathLike | None = None,
    *,
    device: Any = None,
    dtype: Any = None,
    download_root: str | os.PathLike | None = None,
    config: str | None = None,
    weights: str | None = None,
    tokenizer: Any = None,
    clip_model: str = CLIP_HUB_REPO,
    blip_preset: str = "imagereward-v1",
    seed: int = 0,
):
    """Load a baseline scorer in eval mode.

    name: "CLIP", "BLIP" or "Aesthetic" (case-insensitive).
    path: a directory written by `scorer.save_pretrained` (offline, safetensors); a device string here
      ("cpu", "cuda:0") is taken as the device, as in the reference's `load_score(name, device, download_root)`.
    config: "tiny" builds random toy-size weights (seeded by `seed`) for tests and offline demos.
    Otherwise the real weights (see each scorer module's docstring): CLIP / Aesthetic's CLIP from the hub
    repo `clip_model` (a hub name or a local transformers directory); BLIP / Aesthetic's file from the
    reference's URL, or `weights` (a local file, `hf://owner/repo/file` or a URL); `blip_preset` names the
    encoder shapes of the BLIP file (the ViT-L/16 + BERT-base of "imagereward-v1" for model_large.pth).
    `download_root` defaults to ~/.cache/ImageReward for the files.
    device: default CUDA when available, else CPU. dtype: "float32" (default), "bfloat16", "float16".
    """
    import torch

    name = canonical_name(name)
    if isinstance(path, torch.device) or (isinstance(path, str) and (path in ("cpu", "mps") or path.startswith("cuda"))):
        device, path = path, None  # the reference's positional order is load_score(name, device, download_root)
    if config is not None:
        if config != "tiny":
            raise ValueError(f"unknown baseline config {config!r}; only 'tiny' is built in")
        scorer = _build_tiny(name, tokenizer, seed)
    elif path is not None:
        scorer = _load_saved(name, Path(path))
    else:
        source = RealWeights(download_root=download_root, weights=weights, tokenizer=tokenizer,
                             clip_model=clip_model, blip_preset=blip_preset)
        scorer = scorer_module(name).load_real(source)
    return scorer.ready_for_inference(device, dtype)
