"""PickScore and HPSv2 / HPSv2.1: parity with the published formula and the reference `hpsv2` package, and the
places a scorer goes (registry, ReFL reward mix, Serve, `rayapp eval hps`, the multi-reward table).

Checkpoints are random-weight ones the tests write in the official formats: a transformers `CLIPModel`
directory for PickScore, an open_clip state dict under `state_dict` in a `.pt` for HPS. The reference
`hpsv2` (PyPI 1.2.0) runs in its own virtualenv (see `hpsv2_reference`) on a small open_clip architecture
swapped in under the name it hard-codes, ViT-H-14, the same architecture rayapp is given.
"""
from __future__ import annotations

import gzip
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # tools/hpsv2_reference.py

pytestmark = pytest.mark.timeout(600)

# A small open_clip architecture; the text tower keeps CLIP's 49408-token BPE vocabulary (the reference's).
SMALL_ARCHITECTURE = {"embed_dim": 16,
                      "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
PROMPTS = ["A photo of 2 cats, sitting on a RED sofa!", "concept art of a castle at dusk",
           "an anime girl with blue hair", "oil painting: a bowl of fruit (still life)"]

def smooth_image(seed: int, width: int, height: int) -> Image.Image:
    """A deterministic image with structure at several scales (so resizing kernels matter)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((4, 4, 3))
    ys, xs = np.mgrid[0:height, 0:width]
    base = coarse[(ys * 4) // height, (xs * 4) // width]
    noise = rng.random((height, width, 3)) * 0.3
    return Image.fromarray(((base * 0.7 + noise) * 255).clip(0, 255).astype(np.uint8))


def open_clip_state(architecture: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under open_clip's CLIP state-dict names and shapes (what HPS checkpoints hold)."""
    gen = torch.Generator().manual_seed(seed)
    vision, text, embed = architecture["vision_cfg"], architecture["text_cfg"], architecture["embed_dim"]

    def rand(*shape, scale=0.02):
        return torch.randn(*shape, generator=gen) * scale

    def blocks(prefix: str, width: int, layers: int) -> dict:
        state = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            state.update({p + "ln_1.weight": 1 + rand(width, scale=0.1), p + "ln_1.bias": rand(width),
                          p + "attn.in_proj_weight": rand(3 * width, width, scale=0.2),
                          p + "attn.in_proj_bias": rand(3 * width),
                          p + "attn.out_proj.weight": rand(width, width, scale=0.2),
                          p + "attn.out_proj.bias": rand(width),
                          p + "ln_2.weight": 1 + rand(width, scale=0.1), p + "ln_2.bias": rand(width),
                          p + "mlp.c_fc.weight": rand(4 * width, width, scale=0.2),
                          p + "mlp.c_fc.bias": rand(4 * width),
                          p + "mlp.c_proj.weight": rand(width, 4 * width, scale=0.1),
                          p + "mlp.c_proj.bias": rand(width)})
        return state

    vw, tw = vision["width"], text["width"]
    grid = vision["image_size"] // vision["patch_size"]
    state = {"positional_embedding": rand(text["context_length"], tw, scale=0.1),
             "text_projection": rand(tw, embed, scale=0.2), "logit_scale": torch.tensor(float(np.log(1 / 0.07))),
             "visual.class_embedding": rand(vw, scale=0.1), "visual.positional_embedding": rand(grid * grid + 1, vw),
             "visual.proj": rand(vw, embed, scale=0.2),
             "visual.conv1.weight": rand(vw, 3, vision["patch_size"], vision["patch_size"], scale=0.1),
             "visual.ln_pre.weight": 1 + rand(vw, scale=0.1), "visual.ln_pre.bias": rand(vw),
             "visual.ln_post.weight": 1 + rand(vw, scale=0.1), "visual.ln_post.bias": rand(vw),
             "token_embedding.weight": rand(text["vocab_size"], tw, scale=0.2),
             "ln_final.weight": 1 + rand(tw, scale=0.1), "ln_final.bias": rand(tw)}
    state.update(blocks("visual.", vw, vision["layers"]))
    state.update(blocks("", tw, text["layers"]))
    return state


def write_hps_checkpoint(path: Path, architecture: dict, seed: int) -> Path:
    """An HPS-format checkpoint: {"state_dict": open_clip state dict}, as HPS_v2*_compressed.pt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": open_clip_state(architecture, seed)}, path)
    return path


# ------------------------------------------------------------------------------------------- PickScore
@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory) -> Path:
    """A tiny random PickScore in the hub repo's format: CLIPModel.save_pretrained + a CLIP tokenizer."""
    from transformers import CLIPModel

    from rayapp.diffusion.tiny import build_tiny_clip_tokenizer
    from rayapp.eval.baselines.clip import tiny_clip_config

    out = tmp_path_factory.mktemp("pickscore")
    tokenizer = build_tiny_clip_tokenizer(out)
    torch.manual_seed(3)
    model = CLIPModel(tiny_clip_config(tokenizer))
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(100.0)))  # PickScore's trained temperature scale
    model.save_pretrained(out)
    return out


def test_pickscore_equals_the_published_formula(pickscore_dir):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    scorer = rayapp.load_score("PickScore", pickscore_dir, device="cpu")
    assert scorer.name == "PickScore"
    # square and non-square images whose crops agree between CLIP's processor and torchvision's rounding
    images = [smooth_image(i, *size) for i, size in enumerate([(64, 64), (96, 64), (64, 128), (200, 200)])]
    ours = scorer.score_pairs(PROMPTS, images)

    # the authors' snippet: processor -> get_*_features -> normalise -> logit_scale.exp() * image @ text.T
    model = CLIPModel.from_pretrained(pickscore_dir).eval()
    size = model.config.vision_config.image_size
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                 crop_size={"height": size, "width": size}),
                              tokenizer=CLIPTokenizer.from_pretrained(pickscore_dir))
    with torch.no_grad():
        image_inputs = processor(images=images, return_tensors="pt")
        text_inputs = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs).pooler_output
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs).pooler_output
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * (text_embs @ image_embs.T)).diagonal()
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-4, rtol=0)
    assert float(np.ptp(ours)) > 1e-3, "the images must score differently for the comparison to mean anything"

    # saved and reloaded through scorer.json, the same scores
    saved = pickscore_dir.parent / "pickscore_saved"
    scorer.save_pretrained(saved)
    again = rayapp.load_score("pickscore", saved, device="cpu").score_pairs(PROMPTS, images)
    np.testing.assert_allclose(again, ours, atol=1e-6)


# ------------------------------------------------------------------------------------------- HPS reference
REFERENCE_RUNNER = r'''
"""Runs the reference hpsv2 on a small architecture; argv[1]: a JSON job, prints one JSON line."""
import contextlib, io, json, sys, types

import torch
import torch.library

# PyPI's torchvision ships compiled ops for PyPI's torch build, not this CPU one; the reference only uses its
# pure-Python transforms, so the fake-kernel registrations of the detection ops are skipped at import.
_register_fake = torch.library.register_fake
torch.library.register_fake = lambda op, *a, **k: ((lambda fn: fn) if str(op).startswith("torchvision::")
                                                  else _register_fake(op, *a, **k))
import torchvision  # noqa: E402
torch.library.register_fake = _register_fake

from hpsv2.src.open_clip import factory  # noqa: E402

job = json.load(open(sys.argv[1]))
factory._MODEL_CONFIGS["ViT-H-14"] = job["architecture"]  # the reference hard-codes this name

if job["mode"] == "score":
    from hpsv2 import img_score
    out = {str(i): [float(s) for s in img_score.score(job["images"], prompt, cp=job["checkpoint"],
                                                      hps_version=job["version"])]
           for i, prompt in enumerate(job["prompts"])}
else:  # the benchmark protocol; its training-only imports are stubbed (unused by mode="benchmark")
    train = types.ModuleType("hpsv2.src.training.train")
    train.calc_ImageReward = train.inversion_score = None
    data = types.ModuleType("hpsv2.src.training.data")
    data.ImageRewardDataset = data.collate_rank = data.RankingDataset = None
    sys.modules.update({"hpsv2.src.training.train": train, "hpsv2.src.training.data": data})
    from hpsv2 import evaluation
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluation.evaluate(mode="benchmark", root_dir=job["generations"], data_path=job["prompts_dir"],
                            checkpoint_path=job["checkpoint"], batch_size=7, hps_version=job["version"])
    out = {"printed": printed.getvalue()}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="session")
def hpsv2_reference() -> Path:
    """The reference `hpsv2` 1.2.0's interpreter, in the virtualenv `scripts/setup.sh` makes with
    tools/hpsv2_reference.py (the test itself installs nothing: no network in a test)."""
    from hpsv2_reference import VENV, ready

    if not ready():
        pytest.skip(f"no reference hpsv2 venv at {VENV}: run .venv/bin/python tools/hpsv2_reference.py")
    return VENV / "bin" / "python"


def run_reference(python: Path, job: dict, tmp_path: Path, hf_cache: Path | None = None) -> dict:
    """Run REFERENCE_RUNNER on `job` offline; the parsed RESULT line."""
    runner, job_file = tmp_path / "reference_runner.py", tmp_path / "reference_job.json"
    runner.write_text(REFERENCE_RUNNER)
    job_file.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "HPS_ROOT": str(tmp_path / "hps_root"), "CUDA_VISIBLE_DEVICES": ""})
    if hf_cache is not None:
        env["HF_HUB_CACHE"] = str(hf_cache)
    proc = subprocess.run([str(python), str(runner), str(job_file)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def offline_open_clip_cache(root: Path, architecture: dict) -> Path:
    """An offline Hugging Face cache holding the file open_clip fetches for ViT-H-14 / laion2B-s32B-b79K,
    laid out as huggingface_hub lays it out (random weights of the swapped-in architecture)."""
    repo = root / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip_state(architecture, seed=99), snapshot / "open_clip_pytorch_model.bin")
    return root


def reference_tokenizer_dir(python: Path, out: Path) -> Path:
    """A transformers CLIPTokenizer over the reference's own BPE file (the vocabulary open_clip tokenizes with)."""
    from transformers import CLIPTokenizer

    from rayapp.diffusion.tiny import _bytes_to_unicode as bytes_to_unicode

    site_dir = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    lines = gzip.open(site_dir / "hpsv2" / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz").read()
    merges = [tuple(line.split()) for line in lines.decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges, model_max_length=77,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("version", ["HPSv2", "HPSv2.1"])
def test_hps_equals_the_reference_package(version, hpsv2_reference, tmp_path):
    file_name = {"HPSv2": "HPS_v2_compressed.pt", "HPSv2.1": "HPS_v2.1_compressed.pt"}[version]
    checkpoint = write_hps_checkpoint(tmp_path / file_name, SMALL_ARCHITECTURE, seed=len(version))
    sizes = [(32, 32), (50, 80), (100, 60), (64, 64)]
    paths = []
    for i, size in enumerate(sizes):
        paths.append(tmp_path / f"img{i}.png")
        smooth_image(10 + i, *size).save(paths[-1])
    tokenizer = reference_tokenizer_dir(hpsv2_reference, tmp_path / "tokenizer")
    scorer = rayapp.load_score(version, checkpoint, architecture=SMALL_ARCHITECTURE, tokenizer=tokenizer,
                               device="cpu")
    assert scorer.name == version
    ours = {str(i): scorer.score(prompt, [str(p) for p in paths]) for i, prompt in enumerate(PROMPTS)}

    hf_cache = offline_open_clip_cache(tmp_path / "hf_cache", SMALL_ARCHITECTURE)
    reference = run_reference(hpsv2_reference, {"mode": "score", "architecture": SMALL_ARCHITECTURE,
                                                "checkpoint": str(checkpoint), "images": [str(p) for p in paths],
                                                "prompts": PROMPTS, "version": version.replace("HPS", "")},
                              tmp_path, hf_cache)
    for key in ours:
        np.testing.assert_allclose(ours[key], reference[key], atol=1e-4, rtol=0)
    spread = np.ptp([s for values in ours.values() for s in values])
    assert spread > 1e-3, "the scores must differ for the comparison to mean anything"


# ------------------------------------------------------------------------------------------- the places a scorer goes
@pytest.fixture(scope="module")
def saved_scorers(tmp_path_factory, pickscore_dir) -> dict[str, Path]:
    """PickScore (from its transformers directory) and HPSv2.1 (from an HPS .pt of the tiny architecture),
    each loaded from the official format and saved with scorer.save_pretrained (what a spec path names)."""
    from rayapp.diffusion.tiny import build_tiny_clip_tokenizer
    from rayapp.eval.baselines.hps import tiny_architecture

    root = tmp_path_factory.mktemp("saved_scorers")
    tokenizer_dir = root / "clip_tokenizer"
    tokenizer = build_tiny_clip_tokenizer(tokenizer_dir)
    architecture = tiny_architecture(tokenizer)
    checkpoint = write_hps_checkpoint(root / "HPS_v2.1_compressed.pt", architecture, seed=5)
    hps = rayapp.load_score("HPSv2.1", checkpoint, architecture=architecture, tokenizer=tokenizer_dir, device="cpu")
    rayapp.load_score("PickScore", pickscore_dir, device="cpu").save_pretrained(root / "pickscore")
    hps.save_pretrained(root / "hpsv2.1")
    return {"PickScore": root / "pickscore", "HPSv2.1": root / "hpsv2.1"}


def test_refl_reward_mix_reports_each_term(ray_cluster, tmp_path, saved_scorers):
    from rayapp.refl import ReFLConfig, run_refl
    from rayapp.refl.rewards import absolute_reward_paths, parse_reward

    reward = f"imagereward:tiny:1.0,{saved_scorers['PickScore']}:0.5,{saved_scorers['HPSv2.1']}:0.5"
    assert [t.weight for t in parse_reward(reward)] == [1.0, 0.5, 0.5]
    assert absolute_reward_paths("imagereward:1.0,pickscore:0.5,hpsv2.1:0.5") == \
        "imagereward:1,pickscore:0.5,hpsv2.1:0.5"  # the published names parse (their weights load lazily)
    cfg = ReFLConfig.from_preset("offline", output_dir=str(tmp_path / "mix"), run_name="mix", reward=reward,
                                 max_steps=2, eval_every=0, eval_seeds=(0,), max_failures=0, pretrain_weight=0.0)
    result = run_refl(cfg)
    assert result.steps == 2
    first, last = result.eval_history[0], result.eval_history[-1]
    for record in (first, last):
        terms = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("eval_reward/")}
        assert set(terms) == {"ImageReward", "PickScore", "HPSv2.1"}, record
        np.testing.assert_allclose(record["eval_reward"], terms["ImageReward"] + 0.5 * terms["PickScore"]
                                   + 0.5 * terms["HPSv2.1"], rtol=1e-5, atol=1e-6)
    updates = json.loads((Path(cfg.output_dir) / "updates.json").read_text())
    assert len(updates) == 2
    for update in updates:  # every update reports each term of the reward it climbed
        assert {"reward_train/ImageReward", "reward_train/PickScore", "reward_train/HPSv2.1"} <= set(update)
        np.testing.assert_allclose(update["reward_train"], update["reward_train/ImageReward"]
                                   + 0.5 * update["reward_train/PickScore"] + 0.5 * update["reward_train/HPSv2.1"],
                                   rtol=1e-4, atol=1e-5)
    assert Path(result.curve_png).is_file()


def test_serve_config_with_pickscore_and_hps_answers_score_batch(serve_manager, saved_scorers):
    import io

    import requests
    from ray import serve

    from rayapp.serve import wire
    from rayapp.serve.app import build_app

    serve_manager.ensure()
    args = serve_manager.args(
        models=[{"id": "pick", "scorer": "PickScore", "source": str(saved_scorers["PickScore"])},
                {"id": "hps", "scorer": "hpsv2.1", "source": str(saved_scorers["HPSv2.1"])}],
        multiplex=None, scorer_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        api_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}})
    assert [(m.id, m.scorer) for m in args.model_specs()] == [("pick", "PickScore"), ("hps", "HPSv2.1")]
    serve.run(build_app(args), name="rm-prefs", route_prefix="/prefs")
    url = f"http://127.0.0.1:{serve_manager.port}/prefs"
    try:
        images = []
        for i in range(4):  # at the scorers' input size: the same pixels on every path
            buf = io.BytesIO()
            smooth_image(40 + i, 64, 64).save(buf, format="PNG")
            images.append(buf.getvalue())
        prompts = ["a red circle", "two blue squares", "a small yellow square", "three green triangles"]
        for model_id, name in (("pick", "PickScore"), ("hps", "HPSv2.1")):
            resp = requests.post(f"{url}/v1/score_batch", params={"model": model_id},
                                 data=wire.encode_pairs(prompts, images),
                                 headers={"Content-Type": wire.CONTENT_TYPE}, timeout=120)
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["model"] == model_id
            library = rayapp.load_score(name, saved_scorers[name], device="cpu").score_pairs(prompts, images)
            np.testing.assert_allclose(body["scores"], library, rtol=1e-4, atol=1e-5)
        listed = {m["id"]: m["scorer"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["models"]}
        assert listed == {"pick": "PickScore", "hps": "HPSv2.1"}
    finally:
        serve.delete("rm-prefs")


# ------------------------------------------------------------------------------------------- evaluations
def test_eval_hps_gives_the_reference_benchmark_numbers(hpsv2_reference, tmp_path, capsys):
    """`rayapp eval hps` on a generations folder laid out for `hpsv2.evaluation.evaluate_benchmark`: the same
    per-style mean and std (of the 80-prompt group means) and average as the reference prints."""
    from rayapp.cli import main

    checkpoint = write_hps_checkpoint(tmp_path / "HPS_v2.1_compressed.pt", SMALL_ARCHITECTURE, seed=21)
    tokenizer = reference_tokenizer_dir(hpsv2_reference, tmp_path / "tokenizer")
    saved = tmp_path / "hps_saved"
    rayapp.load_score("HPSv2.1", checkpoint, architecture=SMALL_ARCHITECTURE, tokenizer=tokenizer,
                      device="cpu").save_pretrained(saved)
    prompts_dir, generations = tmp_path / "benchmark", tmp_path / "generations" / "mymodel"
    prompts_dir.mkdir()
    counts = {"anime": 170, "concept-art": 6, "paintings": 3, "photo": 2}  # anime: groups of 80, 80 and 10
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for style, count in counts.items():
        prompts = [f"a {colours[i % 6]} {style} scene, number {i}" for i in range(count)]
        (prompts_dir / f"{style}.json").write_text(json.dumps(prompts))
        (generations / style).mkdir(parents=True)
        for i in range(count):
            if style == "concept-art" and i == 2:
                continue  # a missing image: its prompt is left out, as the reference does
            smooth_image(1000 + 7 * i + len(style), 40, 48).save(generations / style / f"{i:05d}.jpg", quality=90)

    out = tmp_path / "hps.json"
    assert main(["eval", "hps", "--prompts-dir", str(prompts_dir), "--generations", str(generations),
                 "--scorer", str(saved), "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| anime |" in printed and "| Average |" in printed
    report = json.loads(out.read_text())
    assert report["styles"]["concept-art"]["images"] == 5 and report["styles"]["anime"]["images"] == 170
    assert report["styles"]["anime"]["std"] > 0  # three groups: the std convention is exercised

    reference = run_reference(hpsv2_reference, {"mode": "benchmark", "architecture": SMALL_ARCHITECTURE,
                                                "checkpoint": str(checkpoint), "generations": str(generations),
                                                "prompts_dir": str(prompts_dir), "version": "v2.1"}, tmp_path)
    lines = [line.split() for line in reference["printed"].splitlines() if line.startswith("mymodel ")]
    printed_ref = {parts[1]: [float(v) for v in parts[2:]] for parts in lines}
    assert set(printed_ref) == {*counts, "Average"}, reference["printed"]
    for style in counts:
        mean, std = printed_ref[style]
        assert abs(report["styles"][style]["mean"] - mean) <= 0.005 + 1e-6, (style, report["styles"][style], mean)
        assert abs(report["styles"][style]["std"] - std) <= 0.00005 + 1e-7, (style, report["styles"][style], std)
    assert abs(report["average"] - printed_ref["Average"][0]) <= 0.005 + 1e-6


def test_multi_reward_table_over_generators(tmp_path, saved_scorers, capsys):
    from rayapp.cli import main

    prompts = [{"id": "p1", "prompt": "a red circle"}, {"id": "p2", "prompt": "two blue squares"},
               {"id": "p3", "prompt": "a small yellow square"}]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    root = tmp_path / "generations"
    for g, generator in enumerate(["model-a", "model-b"]):
        (root / generator).mkdir(parents=True)
        for item in prompts:
            for k in range(2):
                image = smooth_image(100 * g + 10 * int(item["id"][1]) + k, 72, 64)
                image.save(root / generator / f"{item['id']}_{k}.png")
    out, plot = tmp_path / "rewards.json", tmp_path / "rewards.png"
    argv = ["eval", "rewards", "--prompts", str(tmp_path / "prompts.json"), "--generations-root", str(root),
            "--scorer", "ImageReward:tiny", "--scorer", f"PickScore={saved_scorers['PickScore']}",
            "--scorer", f"HPSv2.1={saved_scorers['HPSv2.1']}", "--device", "cpu", "--quiet",
            "--out", str(out), "--plot", str(plot)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Model | ImageReward | PickScore | HPSv2.1 |" in printed
    assert printed.count("| model-") == 2
    report = json.loads(out.read_text())
    assert Image.open(plot).size[0] > 0
    for label in ("PickScore", "HPSv2.1"):
        scorer = rayapp.load_score(label, saved_scorers[label], device="cpu")
        for generator in ("model-a", "model-b"):
            images = sorted((root / generator).glob("*.png"))
            by_prompt = {item["id"]: item["prompt"] for item in prompts}
            scores = scorer.score_pairs([by_prompt[p.stem.split("_")[0]] for p in images], [str(p) for p in images])
            stats = report["results"][label][generator]
            assert stats["images"] == 6
            np.testing.assert_allclose(stats["mean"], np.mean(scores), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stats["std"], np.std(scores), rtol=1e-4, atol=1e-6)
        assert sorted(report["results"][label][g]["rank"] for g in ("model-a", "model-b")) == [1, 2]
