"""Where the baselines' published weights come from: `RealWeights` options, and `fetch_weights` for files
that are not on the Hugging Face hub (fetched once into a local cache)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DOWNLOAD_ROOT = "~/.cache/ImageReward"  # the reference's cache dir, so its downloads are reused
CLIP_HUB_REPO = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class RealWeights:
    """Where `load_real` finds a baseline's published weights (see each scorer module's docstring)."""

    download_root: str | os.PathLike | None = None  # cache of URL downloads (default ~/.cache/ImageReward)
    weights: str | None = None  # a local file, hf://owner/repo/file or a URL instead of the module's default
    tokenizer: Any = None  # a tokenizer object, dir or hub name instead of the module's default
    clip_model: str | None = None  # CLIP hub name or local transformers dir (default: each module's own)
    blip_preset: str = "imagereward-v1"  # encoder shapes of the BLIP file
    architecture: Any = None  # HPS: an open_clip architecture name or config dict (default ViT-H-14)
    scorer: str | None = None  # the registry name being loaded (HPS: which version's file)

    @property
    def cache_dir(self) -> str | None:
        """`download_root` as the `cache_dir` string transformers' from_pretrained takes."""
        return os.fspath(self.download_root) if self.download_root else None


def fetch_weights(source: str, download_root: str | os.PathLike | None = None) -> Path:
    """A local file for `source`: a path, an http(s) URL, or any URI rayapp.data.storage fetches (hf://, s3://...).

    URLs are downloaded once into `download_root` (default ~/.cache/ImageReward, the reference's layout) under
    their file name; other URIs go to rayapp's one URI cache. With HF_HUB_OFFLINE=1 nothing is downloaded.
    """
    import urllib.request

    from rayapp.data import storage

    kind = storage.scheme(source)
    if not kind or kind == "file":
        path = Path(storage.local_path(source))
        if not path.is_file():
            raise FileNotFoundError(f"weights file {source!r} not found")
        return path
    if kind not in storage.HTTP_SCHEMES:
        return Path(storage.local_path(source))
    root = Path(download_root or DEFAULT_DOWNLOAD_ROOT).expanduser()
    target = root / urllib.request.url2pathname(source.rsplit("/", 1)[-1])
    if target.is_file():
        return target
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # one offline switch for every download, the hub's
        raise OSError(f"{target} is not cached and HF_HUB_OFFLINE is set; download {source} there first")
    return storage.download_file(source, target)
