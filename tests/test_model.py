"""The reward model library: architecture presets, checkpoint formats, loading paths, scoring API."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rayapp
from rayapp.model import checkpoint as ckpt
from rayapp.model import load_config
from rayapp.model.config import get_preset, list_presets
from rayapp.model.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageInputError,
    preprocess_pil,
    preprocess_tensor,
)
from rayapp.model.modeling import ImageReward
from rayapp.model.scoring import rank_from_scores
from rayapp.model.tokenizer import load_tokenizer

PROMPT = "two red circles on a blue background"
# every official key, shape, dtype
OFFICIAL_TSV = Path(__file__).resolve().parent / "data" / "imagereward_v1_state_dict.tsv"


def random_image(seed: int, size=(80, 64), mode="RGB") -> Image.Image:
    rng = np.random.RandomState(seed)
    img = Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))
    return img.convert(mode)


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer_dir):
    return rayapp.create_model("tiny", tokenizer=tiny_tokenizer_dir, seed=0).eval()


@pytest.fixture(scope="module")
def images():
    return [random_image(i, size=(60 + 7 * i, 90 - 5 * i)) for i in range(6)]


# ---- architecture -------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", list_presets())
def test_presets_build_and_count_image_tokens(preset):
    config = get_preset(preset)
    with torch.device("meta"):
        model = ImageReward(config, tokenizer=None)
    assert model.vision.embeddings.position_embedding.shape[1] == config.num_image_tokens
    assert model.text.encoder.layer[0].crossattention.self.key.in_features == config.vision_hidden_size
    assert [m.out_features for m in model.head.layers if isinstance(m, torch.nn.Linear)] == [
        *config.head_hidden_sizes, 1]


def test_full_size_preset_matches_every_official_key():
    rows = [line.split("\t") for line in OFFICIAL_TSV.read_text().strip().splitlines()]
    official = {name: tuple(int(x) for x in shape.strip("()").split(",") if x.strip()) for name, shape, _ in rows}
    assert len(official) == 625
    with torch.device("meta"):
        model = ImageReward(get_preset("imagereward-v1"), tokenizer=None)
    ours = {ckpt.internal_to_official(k): tuple(v.shape) for k, v in model.state_dict().items()}
    ignored = {k for k in official if ckpt.IGNORED_OFFICIAL_KEYS.search(k)}
    assert ignored == {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                       "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"}
    assert set(ours) == set(official) - ignored
    assert {k: official[k] for k in ours} == ours
    for key in ours:  # the mapping is a bijection
        assert ckpt.internal_to_official(ckpt.official_to_ours(key)) == key
    assert get_preset("imagereward-v1").num_image_tokens == 197


def test_head_init_is_not_constant(tiny_model, images):
    scores = tiny_model.score(PROMPT, images)
    assert np.std(scores) > 1e-3


def test_import_rayapp_is_light():
    code = ("import sys, rayapp; "
            "heavy = [m for m in ('torch', 'ray', 'transformers', 'deepspeed') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_package_does_not_import_ray_serve_or_diffusers():
    modules = ", ".join(f"rayapp.model.{p.stem}" for p in (Path(rayapp.__file__).parent / "model").glob("*.py"))
    code = (f"import sys, {modules}, rayapp.score_cli; "
            "print([m for m in ('ray', 'deepspeed', 'diffusers', 'rayapp.serve') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_create_model_is_in_train_mode_and_load_in_eval_mode(tiny_tokenizer_dir, tmp_path):
    model = rayapp.create_model("tiny", tokenizer=tiny_tokenizer_dir, seed=0)
    assert model.training and model.head.training  # nn.Module's default, as documented
    model.save_pretrained(tmp_path)
    assert not rayapp.load(tmp_path, device="cpu").training


# ---- checkpoints --------------------------------------------------------------------------------
def test_official_format_round_trip(tiny_model, images, tmp_path):
    tiny_model.config.reward_mean, tiny_model.config.reward_std = 0.3, 2.0  # folded into the export
    try:
        tiny_model.export_official(tmp_path)
        state = torch.load(tmp_path / "ImageReward.pt", weights_only=True)
        assert any(k.startswith("blip.visual_encoder.blocks.0.attn.qkv") for k in state)
        assert "mlp.layers.7.weight" in state
        reloaded = rayapp.load(tmp_path / "ImageReward.pt")
        assert reloaded.config.reward_mean == pytest.approx(0.16717362830052426)
        # the architecture alone, read from the mapped file's shapes, is the one load builds
        assert load_config(tmp_path) == reloaded.config
        assert load_config(tmp_path / "ImageReward.pt").image_size == tiny_model.config.image_size
        np.testing.assert_allclose(reloaded.score(PROMPT, images), tiny_model.score(PROMPT, images), atol=1e-5)
    finally:
        tiny_model.config.reward_mean, tiny_model.config.reward_std = 0.0, 1.0


def test_save_pretrained_round_trip(tiny_model, images, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    reloaded = rayapp.load(tmp_path, device="cpu")
    assert reloaded.score(PROMPT, images) == tiny_model.score(PROMPT, images)
    assert load_config(tmp_path) == reloaded.config


def test_official_checkpoint_errors_name_the_key(tiny_model, tmp_path):
    tiny_model.export_official(tmp_path)
    state = torch.load(tmp_path / "ImageReward.pt", weights_only=True)

    missing = dict(state)
    del missing["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys.*crossattention\.self\.key\.weight"):
        rayapp.load(tmp_path / "missing.pt", med_config=tmp_path / "med_config.json")

    extra = dict(state, **{"blip.visual_encoder.blocks.0.attn.extra_bias": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected keys.*blocks\.0\.attn\.extra_bias"):
        rayapp.load(tmp_path / "extra.pt", med_config=tmp_path / "med_config.json")

    wrong = dict(state)
    key = "blip.text_encoder.encoder.layer.1.intermediate.dense.weight"
    wrong[key] = torch.zeros(7, wrong[key].shape[1])
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatches.*layer\.1\.intermediate\.dense\.weight"):
        rayapp.load(tmp_path / "wrong.pt", med_config=tmp_path / "med_config.json")

    # the unused projections and the position_ids buffer are accepted
    ok = dict(state, **{"blip.vision_proj.weight": torch.zeros(4, 64), "blip.text_proj.bias": torch.zeros(4),
                        "blip.text_encoder.embeddings.position_ids": torch.arange(64)[None]})
    torch.save(ok, tmp_path / "ok.pt")
    rayapp.load(tmp_path / "ok.pt", med_config=tmp_path / "med_config.json")


class _NotATensor:
    pass


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"weights": _NotATensor()}, tmp_path / "evil.pt")
    (tmp_path / "med_config.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="weights-only"):
        rayapp.load(tmp_path / "evil.pt")


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="neither a known model"):
        rayapp.load("ImageReward-v9")
    with pytest.raises(ValueError, match="ImageReward-v1.0"):
        rayapp.load(tmp_path / "nope.pt")
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="med_config.json not found"):
        rayapp.load(tmp_path / "ImageReward.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        rayapp.load(tmp_path / "empty_dir")
    with pytest.raises(OSError, match="no cached copy"):
        rayapp.load("ImageReward-v1.0", download_root=tmp_path / "empty_cache")


def _fake_hub_snapshot(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """Lay out files as the Hugging Face cache stores a snapshot (refs/main -> snapshots/<sha>)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    snapshot = repo_dir / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())


def test_hub_name_loads_from_the_cache_offline(tiny_model, tiny_tokenizer_dir, images, tmp_path):
    export = tmp_path / "export"
    tiny_model.export_official(export)
    med = json.loads((export / "med_config.json").read_text())
    med["rayapp"]["tokenizer"] = "bert-base-uncased"  # resolved through the HF cache like the real model
    (export / "med_config.json").write_text(json.dumps(med))
    hub_cache = tmp_path / "hf_home" / "hub"
    _fake_hub_snapshot(hub_cache, "THUDM/ImageReward",
                       {"ImageReward.pt": export / "ImageReward.pt", "med_config.json": export / "med_config.json"})
    _fake_hub_snapshot(hub_cache, "bert-base-uncased",
                       {name: tiny_tokenizer_dir / name for name in os.listdir(tiny_tokenizer_dir)})
    code = ("import json, sys, rayapp; m = rayapp.load('ImageReward-v1.0', device='cpu'); "
            "print(json.dumps(m.score(sys.argv[1], sys.argv[2:])))")
    paths = []
    for i, img in enumerate(images[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code, PROMPT, *paths], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(json.loads(out.stdout.strip().splitlines()[-1]),
                               tiny_model.score(PROMPT, images[:3]), atol=1e-5)
    # download_root= points the same lookup at an explicit cache directory
    model = rayapp.load("ImageReward-v1.0", download_root=hub_cache, tokenizer=tiny_tokenizer_dir)
    np.testing.assert_allclose(model.score(PROMPT, images[:3]), tiny_model.score(PROMPT, images[:3]), atol=1e-5)


def test_tokenizer_has_blip_tokens_and_pads_to_35(tiny_tokenizer_dir, tiny_model):
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert tok.bos_token == "[DEC]" and "[ENC]" in tok.get_vocab()
    assert tok.convert_tokens_to_ids("[ENC]") == len(tok) - 1
    ids, mask = tiny_model.tokenize([PROMPT, "a " * 100])
    assert ids.shape == (2, 35) and ids[0, 0].item() == tok.cls_token_id and ids[0, -1].item() == 0
    assert mask[1].sum().item() == 35  # truncated, not dropped


# ---- preprocessing ------------------------------------------------------------------------------
def _hand_written_reference(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    arr = np.asarray(img.crop((left, top, left + size, top + size)).convert("RGB"), dtype=np.float32) / 255.0
    return ((arr - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).transpose(2, 0, 1)


@pytest.mark.parametrize("size,mode", [((300, 200), "RGB"), ((201, 333), "RGB"), ((224, 224), "RGB"),
                                       ((100, 57), "RGBA"), ((225, 300), "L"), ((97, 131), "P")])
def test_preprocessing_equals_hand_written_pil_reference(size, mode):
    img = random_image(3, size=size, mode=mode)
    ours = preprocess_pil(img, 224).numpy()
    np.testing.assert_allclose(ours, _hand_written_reference(img, 224), atol=1e-6)


def test_tensor_preprocessing_is_close_to_pil():
    img = random_image(4, size=(200, 150)).filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(2))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    diff = (preprocess_tensor(x, 64)[0] - preprocess_pil(img, 64)).abs()
    assert diff.mean().item() < 0.05  # quantisation + resampling kernel; docs/REFL.md measures the effect


# ---- scoring API ----------------------------------------------------------------------------------
def test_score_shapes(tiny_model, images):
    single = tiny_model.score(PROMPT, images[0])
    assert isinstance(single, float)
    one = tiny_model.score(PROMPT, [images[0]])
    assert isinstance(one, list) and len(one) == 1 and one[0] == pytest.approx(single, abs=1e-6)
    ranking, rewards = tiny_model.inference_rank(PROMPT, images)
    assert sorted(ranking) == list(range(1, len(images) + 1))
    assert ranking[int(np.argmax(rewards))] == 1
    assert rank_from_scores([0.2, 0.9, 0.5]) == [3, 1, 2]


def test_batched_equals_one_by_one(tiny_model, images):
    one_by_one = [tiny_model.score(PROMPT, img) for img in images]
    for batch_size in (1, 4, 16):
        np.testing.assert_allclose(tiny_model.score(PROMPT, images, batch_size=batch_size), one_by_one, atol=1e-5)


def test_score_pairs_matches_score(tiny_model, images):
    prompts = [PROMPT, "a small green square", PROMPT]
    pairs = tiny_model.score_pairs(prompts, images[:3], batch_size=2)
    assert pairs[1] == pytest.approx(tiny_model.score(prompts[1], images[1]), abs=1e-5)
    with pytest.raises(ValueError, match="equal lengths"):
        tiny_model.score_pairs(prompts, images[:2])


def test_every_input_kind_gives_the_same_score(tiny_model, tmp_path):
    img = random_image(7, size=(72, 72))
    img.save(tmp_path / "x.png")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    arr = np.array(img)
    kinds = [img, str(tmp_path / "x.png"), tmp_path / "x.png", buf.getvalue(), arr, arr.astype(np.float32) / 255.0,
             torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0]
    scores = tiny_model.score(PROMPT, kinds)
    np.testing.assert_allclose(scores, [scores[0]] * len(kinds), atol=1e-5)


def test_bad_items_are_named_never_replaced(tiny_model, images, tmp_path):
    with pytest.raises(ImageInputError, match=r"image\[2\].*no such file"):
        tiny_model.score(PROMPT, [images[0], images[1], str(tmp_path / "missing.png")])
    with pytest.raises(ImageInputError, match=r"image\[1\].*cannot decode"):
        tiny_model.score(PROMPT, [images[0], b"not an image at all"])
    png = io.BytesIO()
    images[0].save(png, format="PNG")
    with pytest.raises(ImageInputError, match=r"image\[0\].*cannot decode"):
        tiny_model.score(PROMPT, [png.getvalue()[:200]])  # truncated
    with pytest.raises(ImageInputError, match=r"image\[0\].*unsupported type"):
        tiny_model.score(PROMPT, [42])
    with pytest.raises(ValueError, match="empty"):
        tiny_model.score("   ", images[0])


def test_bfloat16_close_to_float32(tiny_tokenizer_dir, images, tmp_path):
    model = rayapp.create_model("tiny", tokenizer=tiny_tokenizer_dir, seed=1)
    model.save_pretrained(tmp_path)
    fp32 = rayapp.load(tmp_path, dtype="float32").score(PROMPT, images)
    bf16_model = rayapp.load(tmp_path, dtype="bfloat16")
    assert bf16_model.dtype == torch.bfloat16 and bf16_model.head.layers[0].weight.dtype == torch.float32
    bf16 = bf16_model.score(PROMPT, images)
    assert np.max(np.abs(np.array(bf16) - np.array(fp32))) < 0.05 * (1 + np.std(fp32))


def test_to_device_after_loading(tiny_model, images):
    moved = tiny_model.to("cpu")
    assert moved.device.type == "cpu" and isinstance(moved.score(PROMPT, images[0]), float)


def test_reward_is_differentiable_and_matches_score_on_exact_size(tiny_model):
    img = random_image(9, size=(64, 64))
    x = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]).requires_grad_(True)
    reward = tiny_model.reward(x, PROMPT)
    reward.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # at the model's native size no resampling happens, so both paths agree
    assert reward.item() == pytest.approx(tiny_model.score(PROMPT, img), abs=1e-4)


def test_freeze_fix_rate_follows_spec(tiny_tokenizer_dir):
    model = rayapp.create_model("imagereward-v1", tokenizer=tiny_tokenizer_dir,
                                vision_num_layers=24, vision_hidden_size=64, vision_num_heads=2,
                                vision_intermediate_size=64, text_hidden_size=64, text_num_heads=2,
                                text_intermediate_size=64, vocab_size=512, image_size=32, patch_size=16)
    model.freeze_fix_rate(0.7)
    trainable = {n.split(".")[0] + "." + ".".join(n.split(".")[1:4])
                 for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vision.embeddings") or n.startswith("text.embeddings") for n in trainable)
    assert "vision.encoder.layers.15" not in trainable and "vision.encoder.layers.16" in trainable
    assert "text.encoder.layer.7" not in trainable and "text.encoder.layer.8" in trainable
    assert all(p.requires_grad for p in model.head.parameters())


# ---- CLI --------------------------------------------------------------------------------------------
def test_cli_score_table_and_json(tiny_model, images, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    paths = []
    for i, img in enumerate(images[:3]):
        paths.append(str(tmp_path / f"img{i}.png"))
        img.save(paths[-1])
    cmd = [sys.executable, "-m", "rayapp.cli", "score", "--model", str(tmp_path / "model"), "--prompt", PROMPT]
    out = subprocess.run(cmd + ["--json", *paths], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)["results"]
    expected = dict(zip(paths, tiny_model.score(PROMPT, paths)))
    assert [r["image"] for r in results] == sorted(expected, key=lambda p: -expected[p])
    assert results[0]["score"] == pytest.approx(max(expected.values()), abs=1e-5)
    table = subprocess.run(cmd + paths, capture_output=True, text=True)
    assert table.returncode == 0 and table.stdout.splitlines()[1].split()[0] == "1"
    bad = subprocess.run(cmd + [str(tmp_path / "missing.png")], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.png" in bad.stderr and "Traceback" not in bad.stderr
