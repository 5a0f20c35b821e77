#!/usr/bin/env python3
"""Score parity between rayapp and the real reference package (`image-reward` 1.5), offline.

Two phases, two interpreters, connected by files in one directory:

  make       (our venv)        .venv/bin/python tools/reference_parity.py make --out DIR
      Builds the full-size `imagereward-v1` architecture with seeded random weights (every parameter
      perturbed, LayerNorms and biases included), exports it in the official format
      (ImageReward.pt + med_config.json), writes test images (several modes and sizes) and prompts,
      lays out an offline Hugging Face cache (HF_HOME=DIR/hf) holding a synthetic `bert-base-uncased`
      WordPiece vocab and the `THUDM/ImageReward` files, then scores every (prompt, image) pair through
      `rayapp.load("ImageReward-v1.0")` -- the production path -- and writes the scores, token ids and
      intermediate tensors.

  reference  (reference venv)  /tmp/refvenv/bin/python tools/reference_parity.py reference --dir DIR
      Imports the installed `ImageReward` package, loads the same checkpoint with its own `load`,
      scores every pair with its own `score`, and compares: token ids, preprocessed pixels, ViT output,
      text [CLS] features and the final scores. Exit status 0 when every score agrees within --tol.

Both phases run with HF_HUB_OFFLINE=1 and a socket guard: nothing may reach the network.
This file holds no reference code; it only calls the installed package's public functions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# shared helpers (no torch / transformers import at module level: the environment comes first)
# ---------------------------------------------------------------------------------------------
FAKE_SHA = "0000000000000000000000000000000000parity"
BERT_VOCAB_SIZE = 30522  # bert-base-uncased; BLIP's [DEC] / [ENC] then get ids 30522 / 30523

PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    # > 35 tokens: truncation keeps [CLS] + 33 tokens + [SEP]
    ("A highly detailed digital painting of a medieval castle on a cliff above a stormy sea at sunset, "
     "dramatic lighting, volumetric clouds, trending on artstation, by greg rutkowski and alphonse mucha, "
     "8k resolution, ultra realistic, cinematic composition"),
    "Two RED apples & 3 green pears, on a wooden table!!! (studio photo, f/1.8)",
    "Café crème brûlée \u2014 naïve façade, Zürich; 東京タワー at night \U0001F303",
    "  a  cat\tsitting\non a mat  ",
    "don't over-think it: the artist's self-portrait, pre-1900s",
    "supercalifragilisticexpialidocious" * 4 + " unbelievably photorealistic sunset",
    "a dog [SEP] a cat [ENC] [UNK] [MASK]",
    "sunset",
]

# (file name, mode, width, height): portrait, landscape, odd sizes (crop offsets x.5 -> banker's rounding),
# small images that get upscaled, an extreme aspect ratio, an exact 224 square, JPEGs (RGB and CMYK).
IMAGES = [
    ("rgb_landscape_640x480.png", "RGB", 640, 480),
    ("rgb_portrait_300x533.png", "RGB", 300, 533),
    ("rgba_512x512.png", "RGBA", 512, 512),
    ("palette_401x299.png", "P", 401, 299),
    ("gray_227x350.png", "L", 227, 350),
    ("gray_alpha_225x225.png", "LA", 225, 225),
    ("small_upscaled_50x30.png", "RGB", 50, 30),
    ("tiny_16x16.png", "RGB", 16, 16),
    ("wide_1000x120.png", "RGB", 1000, 120),
    ("exact_224x224.png", "RGB", 224, 224),
    ("photo_333x250.jpg", "RGB", 333, 250),
    ("cmyk_260x390.jpg", "CMYK", 260, 390),
]


def block_network() -> None:
    """Make any connection attempt fail loudly instead of hanging or silently succeeding."""
    import socket

    def refuse(*args, **kwargs):
        raise RuntimeError(f"reference_parity: network access attempted ({args[1:] if len(args) > 1 else args})")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]


def offline_env(workdir: Path) -> None:
    """Point the Hugging Face libraries at DIR/hf, offline; must run before they are imported."""
    os.environ["HF_HOME"] = str(workdir / "hf")
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ.pop("TRANSFORMERS_CACHE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    block_network()


def synthetic_bert_vocab() -> list[str]:
    """A bert-base-uncased-shaped vocab (30522 entries, the real special-token ids) over our prompts.

    Some words are present whole, some only as WordPiece pieces (so greedy longest-match splitting is
    exercised), some characters are absent (-> [UNK]); the rest is filler that no prompt can match.
    """
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = []
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    punct = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\u2014"
    pieces += list(punct) + list(chars) + ["##" + c for c in chars]
    words = ["a", "an", "the", "of", "on", "at", "by", "and", "in", "it", "is", "to", "two", "three", "green", "red",
             "pears", "apples", "wooden", "table", "studio", "photo", "f", "highly", "detailed", "digital", "painting",
             "medieval", "castle", "cliff", "above", "stormy", "sea", "sunset", "dramatic", "lighting", "clouds",
             "trending", "art", "station", "greg", "alphonse", "resolution", "ultra", "realistic", "cinematic",
             "composition", "night", "cafe", "creme", "brulee", "naive", "facade", "zurich", "cat", "sitting", "mat",
             "don", "t", "over", "think", "artist", "s", "self", "portrait", "pre", "horse", "moon", "riding", "dog",
             "unbelievably", "real", "8k", "1900s"]
    subwords = ["astro", "##naut", "##graph", "##istic", "##s", "##ing", "rut", "##kowski", "mu", "##cha",
                "volume", "##tric", "##ic", "##ly", "##al", "super", "##cal", "##i", "##fra", "##gil",
                "##ex", "##pi", "##do", "##ous", "東", "京", "タ", "##ワ"]  # "##ー" absent: タワー -> [UNK]
    for token in (*pieces, *words, *subwords):
        if token not in vocab:
            vocab.append(token)
    i = 0
    while len(vocab) < BERT_VOCAB_SIZE:
        vocab.append(f"[filler{i}]")
        i += 1
    return vocab


def fake_hub_snapshot(hf_home: Path, repo: str, files: dict[str, Path | bytes | str], link: bool = False) -> Path:
    """Lay files out as the Hugging Face cache stores a snapshot (refs/main -> snapshots/<sha>)."""
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / FAKE_SHA
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(FAKE_SHA)
    (hf_home / "hub" / "version.txt").write_text("1")  # else transformers 4.x warns about migrating an old cache
    for name, content in files.items():
        target = snapshot / name
        if target.exists() or target.is_symlink():
            target.unlink()
        if isinstance(content, Path):
            if link:
                target.symlink_to(content.resolve())
            else:
                target.write_bytes(content.read_bytes())
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    return snapshot


def write_bert_cache(workdir: Path) -> None:
    """DIR/vocab.txt and a `bert-base-uncased` snapshot holding it (what BertTokenizer.from_pretrained reads)."""
    vocab_file = workdir / "vocab.txt"
    if not vocab_file.is_file():
        vocab_file.write_text("\n".join(synthetic_bert_vocab()) + "\n", encoding="utf-8")
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": BERT_VOCAB_SIZE,
              "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
              "pad_token_id": 0, "layer_norm_eps": 1e-12}
    fake_hub_snapshot(workdir / "hf", "bert-base-uncased", {
        "vocab.txt": vocab_file,
        "tokenizer_config.json": json.dumps({"do_lower_case": True, "model_max_length": 512}),
        "config.json": json.dumps(config),
    })


def make_images(image_dir: Path, seed: int) -> list[Path]:
    """Seeded smooth-plus-noise pictures with a few shapes, saved in the listed modes and sizes."""
    import numpy as np
    from PIL import Image, ImageDraw

    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name, mode, width, height in IMAGES:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([
            127 + 100 * np.sin(xx / max(width, 1) * rng.uniform(2, 9) + rng.uniform(0, 6)),
            127 + 100 * np.cos(yy / max(height, 1) * rng.uniform(2, 9) + rng.uniform(0, 6)),
            127 + 100 * np.sin((xx + yy) / max(width + height, 1) * rng.uniform(2, 9)),
        ], axis=-1)
        base += rng.normal(0, 18, size=base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1, y1 = x0 + int(rng.integers(1, max(2, width // 2))), y0 + int(rng.integers(1, max(2, height // 2)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        if mode == "RGBA":
            alpha = np.clip(255 * (xx / width) + rng.normal(0, 20, xx.shape), 0, 255).astype(np.uint8)
            img = img.convert("RGBA")
            img.putalpha(Image.fromarray(alpha, "L"))
        elif mode == "P":
            img = img.quantize(colors=64)
        elif mode == "LA":
            img = img.convert("LA")
            img.putalpha(Image.fromarray(np.clip(255 * (yy / height), 0, 255).astype(np.uint8), "L"))
        elif mode != "RGB":
            img = img.convert(mode)
        path = image_dir / name
        if name.endswith(".jpg"):
            img.save(path, quality=90)
        else:
            img.save(path)
        with Image.open(path) as check:
            assert check.mode == mode and check.size == (width, height), (name, check.mode, check.size)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# phase 1: ours
# ---------------------------------------------------------------------------------------------
def perturb_(model, seed: int) -> dict:
    """Seeded noise on every parameter: weights get N(0, 0.02) added, 1-D tensors (biases, LayerNorm
    weights and biases) N(0, 0.1), so no LayerNorm is exactly (1, 0) and no bias is exactly 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    stats = {"parameters": 0, "tensors": 0}
    with torch.no_grad():
        for param in model.parameters():
            scale = 0.1 if param.ndim == 1 else 0.02
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)
            stats["parameters"] += param.numel()
            stats["tensors"] += 1
    return stats


def phase_make(out: Path, seed: int, batch_size: int) -> int:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    offline_env(out)

    import shutil
    import time

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import rayapp
    from rayapp.model.config import get_preset
    from rayapp.model.modeling import ImageReward
    from rayapp.model.tokenizer import load_tokenizer

    t0 = time.time()
    write_bert_cache(out)
    tokenizer = load_tokenizer("bert-base-uncased")  # through the fake offline cache, as production does
    print(f"tokenizer: {type(tokenizer).__name__}, {len(tokenizer)} ids", flush=True)

    torch.manual_seed(seed)
    model = ImageReward(get_preset("imagereward-v1"), tokenizer).eval()
    stats = perturb_(model, seed + 1)
    print(f"built + perturbed {stats['tensors']} tensors / {stats['parameters']:,} parameters "
          f"({time.time() - t0:.0f}s)", flush=True)

    export_dir = out / "export"
    model.export_official(export_dir)
    official = out / "official"
    official.mkdir(exist_ok=True)
    for name in ("ImageReward.pt", "med_config.json"):  # the official file pair only, no tokenizer beside it
        shutil.move(str(export_dir / name), str(official / name))
    saved_tokenizer_dir = export_dir  # what export_official wrote besides the official pair
    del model
    print(f"exported ({time.time() - t0:.0f}s)", flush=True)

    fake_hub_snapshot(out / "hf", "THUDM/ImageReward", {
        "ImageReward.pt": official / "ImageReward.pt", "med_config.json": official / "med_config.json"}, link=True)
    # The reference's load(name) fetches into download_root with local_dir semantics: offer the same pair there.
    ref_root = out / "reference_root"
    ref_root.mkdir(exist_ok=True)
    for name in ("ImageReward.pt", "med_config.json"):
        target = ref_root / name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(official / name)

    image_paths = make_images(out / "images", seed)
    prompts = list(PROMPTS)

    model = rayapp.load("ImageReward-v1.0", device="cpu")  # hub name -> fake offline cache -> official loader
    assert model.dtype == torch.float32
    input_ids, attention_mask = model.tokenize(prompts)
    saved_tok = load_tokenizer(saved_tokenizer_dir)
    saved_ids = saved_tok(prompts, padding="max_length", truncation=True, max_length=35,
                          return_tensors="pt")["input_ids"]
    paths = [str(p) for p in image_paths]
    scores = []
    for i, prompt in enumerate(prompts):
        scores.append(model.score(prompt, paths, batch_size=batch_size))
        print(f"ours: prompt {i}: {[f'{s:.5f}' for s in scores[-1]]} ({time.time() - t0:.0f}s)", flush=True)

    # Intermediates for diagnosis: preprocessed pixels, ViT output, text [CLS] features, raw head output.
    with torch.inference_mode():
        pixels = model.preprocess(paths)
        vision = torch.cat([model.vision(pixel_values=pixels[i:i + batch_size]).last_hidden_state
                            for i in range(0, len(paths), batch_size)])
        n_img = len(paths)
        feats = torch.empty(len(prompts), n_img, model.config.text_hidden_size)
        raw = torch.empty(len(prompts), n_img)
        for p in range(len(prompts)):
            out_t = model.text(input_ids=input_ids[p:p + 1].expand(n_img, -1),
                               attention_mask=attention_mask[p:p + 1].expand(n_img, -1),
                               encoder_hidden_states=vision,
                               encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long),
                               is_decoder=False)
            feats[p] = out_t.last_hidden_state[:, 0, :]
            raw[p] = model.head(feats[p])
    torch.save({"pixels": pixels, "vision": vision, "text_cls": feats, "head_raw": raw,
                "input_ids": input_ids, "attention_mask": attention_mask}, out / "ours_tensors.pt")
    record = {
        "seed": seed,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "prompts": prompts,
        "images": [p.name for p in image_paths],
        "input_ids": input_ids.tolist(),
        "tokens": [tokenizer.convert_ids_to_tokens(row) for row in input_ids.tolist()],
        "saved_tokenizer_ids_equal": bool(torch.equal(saved_ids, input_ids)),
        "scores": scores,
    }
    (out / "ours.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    flat = [s for row in scores for s in row]
    print(f"ours: {len(flat)} scores, min {min(flat):.4f} max {max(flat):.4f}; "
          f"saved-tokenizer ids equal hub-tokenizer ids: {record['saved_tokenizer_ids_equal']}; "
          f"wrote {out / 'ours.json'} ({time.time() - t0:.0f}s)", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# phase 2: the reference
# ---------------------------------------------------------------------------------------------
def import_reference():
    """(package, how) -- the whole package when its optional imports (clip, diffusers, datasets, ...) are
    installed; else only its scoring modules, with stub parents so its __init__ files' extra imports are skipped."""
    try:
        import ImageReward as package

        return package, "import ImageReward (whole package)"
    except ImportError as err:
        first_error = f"{type(err).__name__}: {err}"
    import importlib
    import importlib.util
    import types

    for name in [n for n in sys.modules if n == "ImageReward" or n.startswith("ImageReward.")]:
        del sys.modules[name]
    root = Path(importlib.util.find_spec("ImageReward").submodule_search_locations[0])
    for name, path in (("ImageReward", root), ("ImageReward.models", root / "models")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    module = importlib.import_module("ImageReward.ImageReward")
    return module, f"ImageReward.ImageReward only (whole package failed: {first_error})"


def reference_load(package, how: str, workdir: Path):
    """The reference model, built by the package's own `load` where it can be imported."""
    import torch

    official = workdir / "official"
    if hasattr(package, "load"):
        try:  # the reference's default path: a model name, files fetched into download_root
            return package.load("ImageReward-v1.0", device="cpu", download_root=str(workdir / "reference_root")), \
                "load('ImageReward-v1.0', download_root=...)"
        except Exception as err:  # noqa: BLE001 -- fall back to the explicit-path form of the same function
            print(f"reference load by name failed offline ({type(err).__name__}: {err}); loading by path", flush=True)
            return package.load(str(official / "ImageReward.pt"), device="cpu",
                                med_config=str(official / "med_config.json")), "load(path, med_config=path)"
    # Only the model class is importable: the same steps as the package's load (construct, non-strict load, eval).
    model = package.ImageReward(med_config=str(official / "med_config.json"), device="cpu")
    state = torch.load(str(official / "ImageReward.pt"), map_location="cpu")
    model.load_state_dict(state, strict=False)
    return model.eval(), "ImageReward.ImageReward.ImageReward(...) + load_state_dict(strict=False)"


def phase_reference(workdir: Path, tol: float, e2e_prompts: list[int] | None = None) -> int:
    workdir = workdir.resolve()
    offline_env(workdir)
    write_bert_cache(workdir)  # idempotent; the make phase wrote it already

    import time

    import torch
    from PIL import Image

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    ours = json.loads((workdir / "ours.json").read_text(encoding="utf-8"))
    ours_t = torch.load(workdir / "ours_tensors.pt", map_location="cpu")
    package, how = import_reference()
    model, load_how = reference_load(package, how, workdir)
    model.eval()
    print(f"reference imported via {how}; built via {load_how} ({time.time() - t0:.0f}s)", flush=True)
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for mod in ("torchvision", "timm", "fairscale", "PIL"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001
            versions[mod] = f"unknown ({type(err).__name__})"

    # Which keys the reference's non-strict load would have left untouched (it discards that message).
    state = torch.load(workdir / "official" / "ImageReward.pt", map_location="cpu", mmap=True)
    model_keys = set(model.state_dict())
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    mismatched = sorted(k for k in set(state) & model_keys if state[k].shape != model.state_dict()[k].shape)
    del state
    med = json.loads((workdir / "official" / "med_config.json").read_text())
    rayapp_block_attr = getattr(model.blip.text_encoder.config, "rayapp", None)

    report: dict = {"versions": versions, "reference_import": how, "reference_load": load_how,
                    "ours_versions": {"torch": ours["torch"], "transformers": ours["transformers"]},
                    "keys_missing_in_checkpoint": missing, "keys_unexpected_in_checkpoint": unexpected,
                    "keys_shape_mismatch": mismatched,
                    "med_config_rayapp_block": {
                        "present_in_file": "rayapp" in med,
                        "reference_config_attribute": rayapp_block_attr is not None,
                        "reference_encoder_width": model.blip.text_encoder.config.encoder_width}}

    # Tokenisation.
    prompts, images = ours["prompts"], ours["images"]
    tok = model.blip.tokenizer
    token_report = []
    ref_ids_all = []
    for i, prompt in enumerate(prompts):
        enc = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        ref_ids = enc.input_ids[0].tolist()
        ref_ids_all.append(ref_ids)
        if ref_ids != ours["input_ids"][i]:
            diffs = [(j, a, b) for j, (a, b) in enumerate(zip(ref_ids, ours["input_ids"][i])) if a != b]
            token_report.append({"prompt": i, "text": prompt,
                                 "reference_tokens": tok.convert_ids_to_tokens(ref_ids),
                                 "our_tokens": ours["tokens"][i],
                                 "positions (pos, ref id, our id)": diffs})
    report["token_mismatches"] = token_report
    report["special_ids"] = {"[DEC]": tok.convert_tokens_to_ids("[DEC]"), "[ENC]": tok.convert_tokens_to_ids("[ENC]"),
                             "len": len(tok)}
    print(f"token ids: {len(prompts) - len(token_report)}/{len(prompts)} prompts identical", flush=True)

    # Preprocessing and the ViT output, image by image.
    paths = [str(workdir / "images" / name) for name in images]
    with torch.no_grad():
        ref_pixels = torch.stack([model.preprocess(Image.open(p)) for p in paths])
        ref_vision = torch.cat([model.blip.visual_encoder(ref_pixels[i:i + 1]) for i in range(len(paths))])
        if torch.equal(ref_pixels, ours_t["pixels"]):
            ref_vision_on_ours = ref_vision
        else:  # the ViT once more on OUR pixels, to separate preprocessing from the encoder
            ref_vision_on_ours = torch.cat([model.blip.visual_encoder(ours_t["pixels"][i:i + 1])
                                            for i in range(len(paths))])
    pix_diff = (ref_pixels - ours_t["pixels"]).abs().flatten(1).max(1).values
    report["pixels_max_abs_diff_per_image"] = dict(zip(images, pix_diff.tolist()))
    report["vision_max_abs_diff"] = float((ref_vision - ours_t["vision"]).abs().max())
    report["vision_on_our_pixels_max_abs_diff"] = float((ref_vision_on_ours - ours_t["vision"]).abs().max())
    report["vision_abs_max"] = float(ours_t["vision"].abs().max())
    print(f"pixels max |diff| {float(pix_diff.max()):.3g}; ViT output max |diff| {report['vision_max_abs_diff']:.3g} "
          f"(|x| up to {report['vision_abs_max']:.3g}); "
          f"on our pixels {report['vision_on_our_pixels_max_abs_diff']:.3g} "
          f"({time.time() - t0:.0f}s)", flush=True)

    # Text [CLS] features and raw head output on identical inputs (our ids, our ViT output).
    with torch.no_grad():
        cls_diffs, raw_diffs = [], []
        for p in range(len(prompts)):
            n = len(paths)
            ids = ours_t["input_ids"][p:p + 1].expand(n, -1)
            mask = ours_t["attention_mask"][p:p + 1].expand(n, -1)
            out = model.blip.text_encoder(ids, attention_mask=mask, encoder_hidden_states=ours_t["vision"],
                                          encoder_attention_mask=torch.ones(ours_t["vision"].shape[:-1],
                                                                            dtype=torch.long),
                                          return_dict=True)
            cls = out.last_hidden_state[:, 0, :].float()
            cls_diffs.append(float((cls - ours_t["text_cls"][p]).abs().max()))
            raw_diffs.append(float((model.mlp(cls).squeeze(-1) - ours_t["head_raw"][p]).abs().max()))
        # Reference scores composed from its own stages (its ids, its pixels, its ViT, text encoder, head and
        # normalisation): the same arithmetic as its score(), without re-running the ViT for every prompt.
        composed = []
        for prompt in prompts:
            enc = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            n = len(paths)
            out = model.blip.text_encoder(enc.input_ids.expand(n, -1), attention_mask=enc.attention_mask.expand(n, -1),
                                          encoder_hidden_states=ref_vision,
                                          encoder_attention_mask=torch.ones(ref_vision.shape[:-1], dtype=torch.long),
                                          return_dict=True)
            rewards = (model.mlp(out.last_hidden_state[:, 0, :].float()) - model.mean) / model.std
            composed.append(rewards.squeeze(-1).tolist())
    report["text_cls_max_abs_diff"] = max(cls_diffs)
    report["head_raw_max_abs_diff"] = max(raw_diffs)
    print(f"text [CLS] max |diff| {max(cls_diffs):.3g}; raw head max |diff| {max(raw_diffs):.3g}", flush=True)

    # The end-to-end scores through the reference's own score().
    composed_diffs = [abs(a - b) for r, o in zip(composed, ours["scores"]) for a, b in zip(r, o)]
    report["composed_scores_max_abs_diff"] = max(composed_diffs)
    print(f"reference stages composed, all {len(composed_diffs)} pairs: max |diff| {max(composed_diffs):.3g}",
          flush=True)
    ref_scores = []
    e2e = range(len(prompts)) if e2e_prompts is None else e2e_prompts
    for i in e2e:
        prompt = prompts[i]
        ref_scores.append(list(model.score(prompt, paths)))  # list input -> its inference_rank loop
        gap = max(abs(a - b) for a, b in zip(ref_scores[-1], ours["scores"][i]))
        print(f"reference: prompt {i}: {[f'{s:.5f}' for s in ref_scores[-1]]}, max |diff| vs ours {gap:.3g} "
              f"({time.time() - t0:.0f}s)", flush=True)
    single = [model.score(prompts[0], p) for p in paths[:2]]  # the one-image (scalar) path too
    ours_e2e = [ours["scores"][i] for i in e2e]
    diffs = [[abs(a - b) for a, b in zip(r, o)] for r, o in zip(ref_scores, ours_e2e)]
    flat = [d for row in diffs for d in row]
    worst = max(((d, i, j) for i, row in enumerate(diffs) for j, d in enumerate(row)))
    report["scores_reference"] = ref_scores
    report["scores_ours"] = ours["scores"]
    report["single_image_path_max_abs_diff"] = max(abs(a - b) for a, b in zip(single, ours["scores"][0][:2]))
    report["max_abs_diff"] = worst[0]
    report["mean_abs_diff"] = sum(flat) / len(flat)
    report["worst_pair"] = {"prompt": list(e2e)[worst[1]], "image": images[worst[2]]}
    report["end_to_end_prompts"] = list(e2e)
    report["per_prompt_max_abs_diff"] = [max(row) for row in diffs]
    report["per_image_max_abs_diff"] = dict(zip(images, [max(col) for col in zip(*diffs)]))
    all_ours = [s for row in ours["scores"] for s in row]
    report["score_range_ours"] = [min(all_ours), max(all_ours)]
    report["tolerance"] = tol
    report["pass"] = worst[0] <= tol and report["composed_scores_max_abs_diff"] <= tol and not token_report
    (workdir / "parity_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")

    print("\n=== reference parity ===")
    print(f"reference: {how}; {load_how}; versions {versions}")
    print(f"ours: torch {ours['torch']}, transformers {ours['transformers']}")
    print(f"checkpoint keys the reference model lacks in the file (left at its init): {missing}")
    print(f"unexpected keys: {unexpected}; shape mismatches: {mismatched}")
    print(f"end-to-end score() pairs: {len(flat)} ({len(list(e2e))} prompts x {len(images)} images); "
          f"score range (ours) {min(all_ours):.4f} .. {max(all_ours):.4f}")
    print(f"token ids identical: {not token_report}")
    for item in token_report:
        positions = item["positions (pos, ref id, our id)"]
        print(f"  prompt {item['prompt']} {item['text']!r}: differing positions {positions}")
        print(f"    reference: {item['reference_tokens']}")
        print(f"    ours:      {item['our_tokens']}")
    print(f"pixels max |diff| {float(pix_diff.max()):.3g}; ViT {report['vision_max_abs_diff']:.3g}; "
          f"text CLS {report['text_cls_max_abs_diff']:.3g}; raw head {report['head_raw_max_abs_diff']:.3g}")
    print(f"composed reference scores, all {len(composed_diffs)} pairs: max |diff| {max(composed_diffs):.3g}")
    print(f"score() max |diff| {worst[0]:.3g} (prompt {list(e2e)[worst[1]]}, {images[worst[2]]}), "
          f"mean {report['mean_abs_diff']:.3g}; "
          f"single-image path {report['single_image_path_max_abs_diff']:.3g}")
    print(f"{'PASS' if report['pass'] else 'FAIL'} at tolerance {tol:g}; report: {workdir / 'parity_report.json'}")
    return 0 if report["pass"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    make = sub.add_parser("make", help="our venv: build, export and score a random full-size model")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--seed", type=int, default=1234)
    make.add_argument("--batch-size", type=int, default=16)
    ref = sub.add_parser("reference", help="reference venv: score with image-reward 1.5 and compare")
    ref.add_argument("--dir", type=Path, required=True)
    ref.add_argument("--tol", type=float, default=1e-4)
    ref.add_argument("--e2e-prompts", type=int, nargs="*", default=None,
                     help="prompt indices to score end to end with the reference's score() (default: all; "
                          "each costs one ViT pass per image); all pairs are always compared via its composed stages")
    args = parser.parse_args(argv)
    if args.phase == "make":
        return phase_make(args.out, args.seed, args.batch_size)
    return phase_reference(args.dir, args.tol, args.e2e_prompts)


if __name__ == "__main__":
    sys.exit(main())
