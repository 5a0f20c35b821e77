"""Publishing reward models on the Hugging Face Hub: the model card and the folder `push_to_hub` uploads.

A pushed repo is a `save_pretrained` folder (config.json, model.safetensors, tokenizer files) with a README.md
model card whose YAML metadata names `library_name: rayapp`, tags, licence, base model, and the run's metrics
and resolved config. `rayapp.load("owner/repo")` loads it back (rayapp.model.loading; the hub download goes
through rayapp.data.storage). Writing the folder needs no network; only `push_to_hub`'s upload does.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt

MODEL_CARD = "README.md"
DEFAULT_LICENSE = "apache-2.0"
DEFAULT_TAGS = ("rayapp", "image-reward", "reward-model", "human-preference", "text-to-image")
# Known names and the hub repo their weights come from (the base model a fine-tuned card names).
BASE_MODELS = {"ImageReward-v1.0": "THUDM/ImageReward"}


def base_model_of(init: str | None) -> str | None:
    """The hub repo a run started from: a known name's repo, a repo id or hf:// URI as given; None for a local
    path or a random init."""
    from rayapp.data import storage

    if not init:
        return None
    if init in BASE_MODELS:
        return BASE_MODELS[init]
    uri = init if storage.scheme(init) == "hf" else storage.hub_uri(init)
    if uri is None:
        return None
    owner, repo = uri[len("hf://"):].split("/")[:2]
    return f"{owner}/{repo}"


def _plain(value: Any) -> Any:
    """`value` as JSON/YAML-safe data (numpy scalars, paths and the like become numbers or text)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def model_card(model_config: dict, *, repo_id: str | None = None, metrics: dict | None = None,
               run_config: dict | None = None, base_model: str | None = None, license: str = DEFAULT_LICENSE,
               tags: Sequence[str] = ()) -> str:
    """The README.md text: YAML metadata (library_name, tags, license, base_model, rayapp: metrics, config,
    architecture) and a short body saying what the model is and how to load it."""
    from huggingface_hub import ModelCardData

    metrics = _plain(metrics or {})
    data = ModelCardData(
        library_name="rayapp", license=license, base_model=base_model,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        rayapp={"metrics": metrics, "config": _plain(run_config or {}), "architecture": _plain(model_config)},
    )
    name = repo_id or "OWNER/REPO"
    size = f"{model_config.get('image_size')} px images, {model_config.get('max_length')} prompt tokens"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {repo_id.split('/')[-1] if repo_id else 'ImageReward reward model'}", "",
        "An ImageReward text-to-image human-preference reward model (BLIP encoders and an MLP head; "
        f"{size}), trained and exported with rayapp (ImageReward on Ray)."
        + (f" Fine-tuned from [{base_model}](https://huggingface.co/{base_model})." if base_model else ""), "",
        "```python", "import rayapp", "", f'model = rayapp.load("{name}")   # or "hf://{name}"',
        'model.score("a red circle", ["a.png", "b.png"])  # one reward per image, higher is preferred', "```", "",
        "Files: `config.json` (architecture and reward normalisation), `model.safetensors`, the tokenizer files.",
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in metrics.items() if not isinstance(value, (dict, list))]
    if run_config:
        lines += ["", "The run's resolved config is the `rayapp.config` entry of the metadata above."]
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | os.PathLike, **card: Any) -> Path:
    """Write README.md into a `save_pretrained` directory, the architecture read from its config.json."""
    directory = Path(directory)
    model_config = json.loads((directory / ckpt.PRETRAINED_CONFIG).read_text())
    path = directory / MODEL_CARD
    path.write_text(model_card(model_config, **card), encoding="utf-8")
    return path


def write_hub_folder(model, folder: str | os.PathLike, **card: Any) -> Path:
    """The folder `push_to_hub` uploads: config.json, model.safetensors, tokenizer files and README.md."""
    folder = Path(folder)
    ckpt.save_pretrained(model, folder)
    write_model_card(folder, **card)
    return folder


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload rayapp reward model", api=None, **card: Any):
    """Upload a reward model (or a `save_pretrained` directory, with its card) to the hub repo `repo_id`,
    creating the repo if needed; returns huggingface_hub's CommitInfo.

    `card`: metrics, run_config, base_model, license, tags for the model card (a directory that already has a
    README.md keeps it). `api`: an `huggingface_hub.HfApi` (default: one with `token`).
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="rayapp-hub-") as staging:
        if isinstance(model, (str, os.PathLike)):
            folder = Path(model)
            if not (folder / ckpt.PRETRAINED_CONFIG).is_file():
                raise FileNotFoundError(f"{folder}: not a save_pretrained directory (no {ckpt.PRETRAINED_CONFIG})")
            if not (folder / MODEL_CARD).is_file():
                folder = Path(staging) / "model"
                import shutil

                shutil.copytree(model, folder)
                write_model_card(folder, repo_id=repo_id, **card)
        else:
            folder = write_hub_folder(model, Path(staging) / "model", repo_id=repo_id, **card)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), commit_message=commit_message)
