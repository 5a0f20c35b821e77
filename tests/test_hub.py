"""Hugging Face Hub: loading `owner/repo[/dir]` and `hf://owner/repo[/dir]` in both checkpoint layouts from an offline
cache laid out as huggingface_hub lays it out, and the folder and model card `push_to_hub` uploads.

No network: the cache is written here (HF_HUB_CACHE, HF_HUB_OFFLINE=1, read by huggingface_hub at import, so the
hub loads run in one subprocess); the upload goes to a stand-in for huggingface_hub's `HfApi` that keeps a copy
of what it was given.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import rayapp
from rayapp.model.hub import MODEL_CARD, write_hub_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle"


def cache_repo(cache: Path, repo_id: str, source: Path) -> Path:
    """Put every file under `source` into the hub cache as huggingface_hub does: content-addressed blobs,
    snapshots/<commit>/<path> symlinks to them, refs/main naming the commit. Returns the snapshot folder."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(f"{p.relative_to(source)}:{p.stat().st_size}" for p in files).encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi` at the two calls `push_to_hub` makes; keeps a copy of the uploaded
    folder (the original is a temporary directory)."""

    def __init__(self, copy_to: Path):
        self.copy_to = copy_to
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, **kwargs}))
        shutil.copytree(folder_path, self.copy_to)
        return f"https://huggingface.co/{repo_id}/commit/0"


def front_matter(card: str) -> dict:
    """The YAML metadata block of a model card."""
    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer_dir):
    return rayapp.create_model("tiny", tokenizer=tiny_tokenizer_dir, seed=3).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("hub_images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(str(out / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_push_to_hub_uploads_weights_config_tokenizer_and_card(tiny_model, images, tmp_path):
    """The uploaded folder loads back to the same scores; its README.md metadata carries what a run knows."""
    metrics = {"accuracy": 0.75, "best_val_loss": np.float32(0.5), "best_step": 12}
    run_config = {"learning_rate": 1e-5, "adam_betas": [0.9, 0.999], "init": None}
    api = RecordingHfApi(tmp_path / "uploaded")
    commit = tiny_model.push_to_hub("acme/tiny-rm", api=api, metrics=metrics, run_config=run_config,
                                    base_model="THUDM/ImageReward", private=True)

    assert commit == "https://huggingface.co/acme/tiny-rm/commit/0"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "acme/tiny-rm", "private": True, "exist_ok": True}
    assert api.calls[1][1]["repo_id"] == "acme/tiny-rm"
    uploaded = api.copy_to
    names = {p.name for p in uploaded.iterdir()}
    assert {"config.json", "model.safetensors", MODEL_CARD, "tokenizer_config.json"} <= names, names
    assert names & {"tokenizer.json", "vocab.txt"}, names
    assert not names & {"ImageReward.pt", "pytorch_model.bin"}  # safetensors only

    meta = front_matter((uploaded / MODEL_CARD).read_text())
    assert meta["library_name"] == "rayapp" and meta["license"] == "apache-2.0"
    assert meta["base_model"] == "THUDM/ImageReward"
    assert {"rayapp", "image-reward", "reward-model"} <= set(meta["tags"])
    assert meta["rayapp"]["metrics"] == {"accuracy": 0.75, "best_val_loss": 0.5, "best_step": 12}
    assert meta["rayapp"]["config"] == run_config
    assert meta["rayapp"]["architecture"] == json.loads((uploaded / "config.json").read_text())
    assert 'rayapp.load("acme/tiny-rm")' in (uploaded / MODEL_CARD).read_text()

    expected = tiny_model.score(PROMPT, images)
    assert rayapp.load(uploaded, device="cpu").score(PROMPT, images) == pytest.approx(expected, abs=1e-6)


def test_push_a_saved_directory_keeps_its_card(tiny_model, tmp_path):
    """`rayapp.push_to_hub(dir, repo)` uploads a trained run's model folder as it is, card included."""
    folder = write_hub_folder(tiny_model, tmp_path / "model", metrics={"accuracy": 0.5})
    api = RecordingHfApi(tmp_path / "uploaded")
    rayapp.push_to_hub(folder, "acme/run", api=api)
    assert api.calls[1][1]["folder_path"] == os.fspath(folder)
    assert front_matter((api.copy_to / MODEL_CARD).read_text())["rayapp"]["metrics"] == {"accuracy": 0.5}
    with pytest.raises(FileNotFoundError, match="not a save_pretrained directory"):
        rayapp.push_to_hub(tmp_path, "acme/run", api=api)


def test_load_owner_repo_from_offline_cache_in_both_layouts(tiny_model, images, tmp_path):
    """owner/repo, owner/repo/dir and hf://owner/repo/dir load the save_pretrained and the official layout from
    the offline cache, scoring as the local copies do; a repo absent from the cache is a clear error."""
    pretrained, official = tmp_path / "src" / "model", tmp_path / "src" / "official"
    tiny_model.save_pretrained(pretrained)
    tiny_model.export_official(official)
    cache = tmp_path / "hub"
    cache_repo(cache, "acme/rm-pretrained", pretrained)
    cache_repo(cache, "acme/rm-official", official)
    both = cache_repo(cache, "acme/rm-both", tmp_path / "src")

    specs = ["acme/rm-pretrained", "hf://acme/rm-pretrained", "acme/rm-official", "acme/rm-both/model",
             "acme/rm-both/official", "hf://acme/rm-both/official"]
    script = f"""
import json, sys
import rayapp
from rayapp import scorers
from rayapp.data import storage
images, specs = {images!r}, {specs!r}
out = {{spec: rayapp.load(spec, device="cpu").score({PROMPT!r}, images) for spec in specs}}
out["scorer acme/rm-both/model"] = scorers.load("acme/rm-both/model", device="cpu").score({PROMPT!r}, images)
out["local"] = storage.local_path("hf://acme/rm-both/official")
try:
    rayapp.load("acme/not-cached")
except OSError as err:
    out["error"] = str(err)
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    local_pretrained = rayapp.load(pretrained, device="cpu").score(PROMPT, images)
    local_official = rayapp.load(official, device="cpu").score(PROMPT, images)
    for spec in ("acme/rm-pretrained", "hf://acme/rm-pretrained", "acme/rm-both/model", "scorer acme/rm-both/model"):
        assert got[spec] == pytest.approx(local_pretrained, abs=1e-6), spec
    for spec in ("acme/rm-official", "acme/rm-both/official", "hf://acme/rm-both/official"):
        assert got[spec] == pytest.approx(local_official, abs=1e-6), spec
    assert len(set(map(round, local_pretrained, [6] * 3))) == 3  # distinct scores: the comparison can fail
    assert got["local"] == os.fspath(both / "official")
    assert "acme/not-cached" in got["error"] and "cache" in got["error"]


def test_names_that_are_no_model_get_a_clear_error(tmp_path):
    from rayapp.data.storage import hub_uri

    assert hub_uri("acme/rm/sub") == "hf://acme/rm/sub" and hub_uri("ImageReward-v1.0") is None
    assert hub_uri("./acme/rm") is None and hub_uri("s3://b/k") is None and hub_uri("a/../b") is None
    (tmp_path / "acme" / "rm").mkdir(parents=True)
    assert hub_uri(tmp_path / "acme" / "rm") is None  # an existing path stays a path
    with pytest.raises(ValueError, match="neither a known model.*repo id"):
        rayapp.load("ImageReward-v9")
