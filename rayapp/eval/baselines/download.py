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
    clip_model: str = CLIP_HUB_REPO  # CLIP hub name or local transformers dir (CLIP, Aesthetic)
    blip_preset: str = "imagereward-v1"  # encoder shapes of the BLIP file

    @property
    def cache_dir(self) -> str | None:
        """`download_root` as the `cache_dir` string transformers' from_pretrained takes."""
        return os.fspath(self.download_root) if self.download_root else None


def fetch_weights(source: str, download_root: str | os.PathLike | None = None) -> Path:
    """A local file for `source`: a path, `hf://owner/repo/file` (huggingface_hub), or an https URL.

    URLs are downloaded once into `download_root` (default ~/.cache/ImageReward) under their file name,
    through a temporary file renamed on completion; with HF_HUB_OFFLINE=1 only cached files are used.
    """
    import urllib.request

    if source.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        owner, repo, filename = source[len("hf://"):].split("/", 2)
        return Path(hf_hub_download(repo_id=f"{owner}/{repo}", filename=filename,
                                    cache_dir=os.fspath(download_root) if download_root else None))
    if not source.startswith(("http://", "https://")):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {source!r} not found")
        return path
    root = Path(download_root or DEFAULT_DOWNLOAD_ROOT).expanduser()
    target = root / urllib.request.url2pathname(source.rsplit("/", 1)[-1])
    if target.is_file():
        return target
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # one offline switch for every download, the hub's
        raise OSError(f"{target} is not cached and HF_HUB_OFFLINE is set; download {source} there first")
    root.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(source) as response, open(partial, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    os.replace(partial, target)
    return target
