"""The one factory (`create_model`) and the loader (`load`) for hub names and repos, URIs, official files and our
dirs."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import RewardModelConfig, get_preset
from .modeling import ImageReward
from .tokenizer import load_tokenizer

# Known names -> (hub repo, weights file, med_config file). Downloads go through the Hugging Face cache.
MODELS = {
    "ImageReward-v1.0": ("THUDM/ImageReward", ckpt.OFFICIAL_WEIGHTS, ckpt.OFFICIAL_MED_CONFIG),
}


def available_models() -> list[str]:
    """Names `load` can fetch from the hub."""
    return list(MODELS)


def _resolve_tokenizer(tokenizer: Any, config: RewardModelConfig, beside: Path | None):
    """A tokenizer object from: the argument (object or name/dir), files beside the weights, or the config."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if beside is not None and ckpt.has_tokenizer_files(beside):
        return load_tokenizer(beside)
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    raise ValueError("no tokenizer: the config names none and none was saved with the weights; pass tokenizer=")


def create_model(preset: str | RewardModelConfig = "tiny", *, tokenizer: Any = None, seed: int | None = None,
                 **overrides) -> ImageReward:
    """Build any architecture (a preset name or a config) with fresh weights: CPU, float32, train mode
    (nn.Module's default; call `.eval()` before scoring, or use `load`, which returns eval mode)."""
    config = preset if isinstance(preset, RewardModelConfig) else get_preset(preset, **overrides)
    if isinstance(preset, RewardModelConfig) and overrides:
        config = RewardModelConfig.from_dict({**preset.to_dict(), **overrides})
    tok = _resolve_tokenizer(tokenizer, config, None)
    if seed is not None:
        torch.manual_seed(seed)
    return ImageReward(config, tok)


def _download(name: str, download_root: str | None) -> tuple[Path, Path]:
    """Fetch (or find in the cache) the weights and med_config of a known model name."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, weights, med = MODELS[name]
    try:
        return (Path(hf_hub_download(repo, weights, cache_dir=download_root)),
                Path(hf_hub_download(repo, med, cache_dir=download_root)))
    except LocalEntryNotFoundError as err:
        raise OSError(
            f"cannot get {name!r} ({repo}): no network or HF_HUB_OFFLINE is set, and no cached copy was found "
            f"in {download_root or 'the Hugging Face cache (HF_HOME / HF_HUB_CACHE)'}. Run once online, or pass "
            f"a local path to {weights}."
        ) from err
    except HfHubHTTPError as err:
        raise OSError(f"downloading {name!r} from {repo} failed: {err}") from err


def _model_for_loading(config: RewardModelConfig, tokenizer: Any) -> ImageReward:
    """Build the architecture without random init (the weights are overwritten right after): ~10x faster."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return ImageReward(config, tokenizer)


def _fetch(key: str) -> Path | None:
    """The local copy of a URI or hub repo id (`owner/repo[/dir]`, `hf://...`, `s3://...`); None for others."""
    from rayapp.data import storage

    if storage.is_uri(key):
        return Path(storage.local_path(key))
    uri = storage.hub_uri(key)
    if uri is None:
        return None
    try:
        return Path(storage.local_path(uri))
    except OSError as err:  # a mistyped local path reads like a repo id: say both
        raise type(err)(f"{key!r} is no local file or directory, and as a Hugging Face repo id: {err}") from err


def _locate(name_or_path: str | os.PathLike, med_config: str | os.PathLike | dict | None,
            download_root: str | os.PathLike | None) -> tuple[Path, Path | dict | None]:
    """(weights file or save_pretrained dir, med_config) for a known name, a hub repo, a URI, an official file, or
    a directory."""
    key = os.fspath(name_or_path)
    if key in MODELS:
        weights, med_path = _download(key, os.fspath(download_root) if download_root else None)
        return weights, med_config if med_config is not None else med_path
    path = _fetch(key) or Path(key).expanduser()
    if path.is_dir() and (path / ckpt.PRETRAINED_CONFIG).is_file():
        return path, None
    if path.is_dir() and (path / ckpt.OFFICIAL_WEIGHTS).is_file():
        return path / ckpt.OFFICIAL_WEIGHTS, med_config or path / ckpt.OFFICIAL_MED_CONFIG
    if path.is_file():
        return path, med_config or path.with_name(ckpt.OFFICIAL_MED_CONFIG)
    if path.is_dir():
        raise FileNotFoundError(
            f"{key}: directory holds neither {ckpt.PRETRAINED_CONFIG} (rayapp format) nor {ckpt.OFFICIAL_WEIGHTS}"
        )
    raise ValueError(
        f"{key!r} is neither a known model ({', '.join(available_models())}), an existing file or directory, a "
        f"Hugging Face repo id (owner/repo[/dir]) nor a URI (hf://owner/repo[/dir], s3://, https://, ...)"
    )


def _read_med_config(weights: Path, med_config: Path | dict) -> dict:
    if isinstance(med_config, dict):
        return med_config
    if not Path(med_config).is_file():
        raise FileNotFoundError(
            f"med_config.json not found at {med_config}; put it beside {weights.name} or pass med_config="
        )
    return json.loads(Path(med_config).read_text())


def _official_config(weights: Path, med_config: Path | dict, *, mmap: bool) -> tuple[RewardModelConfig, dict]:
    """The architecture of an official checkpoint (text from med_config, the rest from tensor shapes), and
    its state (memory-mapped when only the shapes are wanted)."""
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint not found: {weights}")
    med = _read_med_config(weights, med_config)
    state = ckpt.read_state_dict(weights, mmap=mmap)
    return ckpt.config_from_official(state, med), state


def _load_official(weights: Path, med_config: Path | dict, tokenizer: Any) -> ImageReward:
    config, state = _official_config(weights, med_config, mmap=False)
    model = _model_for_loading(config, _resolve_tokenizer(tokenizer, config, weights.parent))
    ckpt.load_official_into(model, state, os.fspath(weights))
    return model


def _load_pretrained(directory: Path, tokenizer: Any) -> ImageReward:
    config = RewardModelConfig.load(directory / ckpt.PRETRAINED_CONFIG)
    model = _model_for_loading(config, _resolve_tokenizer(tokenizer, config, directory))
    state = ckpt.read_pretrained_state(directory)
    ckpt.load_state_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                           os.fspath(directory / ckpt.PRETRAINED_WEIGHTS))
    return model


def load_config(name_or_path: str | os.PathLike = "ImageReward-v1.0", *,
                med_config: str | os.PathLike | dict | None = None,
                download_root: str | os.PathLike | None = None) -> RewardModelConfig:
    """The architecture `load` would build for the same arguments, without building it or reading the weights'
    values (an official file is memory-mapped for its tensor shapes)."""
    weights, med = _locate(name_or_path, med_config, download_root)
    if med is None:
        return RewardModelConfig.load(weights / ckpt.PRETRAINED_CONFIG)
    return _official_config(weights, med, mmap=True)[0]


def load(name_or_path: str | os.PathLike = "ImageReward-v1.0", *, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, med_config: str | os.PathLike | dict | None = None,
         download_root: str | os.PathLike | None = None, tokenizer: Any = None) -> ImageReward:
    """Load a reward model in eval mode.

    name_or_path: a name in `available_models()` (downloaded into the Hugging Face cache, or
    `download_root`), an official `ImageReward.pt`, a directory holding one, a `save_pretrained` dir, a hub
    repo `owner/repo[/dir]` or `hf://owner/repo[/dir]` holding either layout (fetched into the Hugging Face
    cache; HF_HUB_OFFLINE=1 uses the cached copy), or any URI `rayapp.data.storage` fetches (s3://, https://).
    device: defaults to CUDA when available. dtype: float32 (default), bfloat16 or float16 for the
    encoders; the head stays float32.
    """
    weights, med = _locate(name_or_path, med_config, download_root)
    model = _load_pretrained(weights, tokenizer) if med is None else _load_official(weights, med, tokenizer)
    return model.ready_for_inference(device, dtype)


def weights_file(name_or_path: str | os.PathLike = "ImageReward-v1.0", *,
                 download_root: str | os.PathLike | None = None) -> Path:
    """The file `load` reads the weights from: a `save_pretrained` dir's model.safetensors, or the official .pt."""
    weights, med = _locate(name_or_path, None, download_root)
    return weights / ckpt.PRETRAINED_WEIGHTS if med is None else weights
