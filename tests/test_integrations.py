"""The WebUI integrations: the AUTOMATIC1111 script and the ComfyUI nodes, against the library's scores.

The A1111 script runs against tests/webui_standin (a documented stand-in of the WebUI's `modules` and of
gradio, not the WebUI); the ComfyUI nodes are plain classes, called the way ComfyUI calls them. Both
score with a tiny checkpoint, in-process and through the session's real Serve endpoint on loopback.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO_ROOT, free_port
from PIL import Image

pytestmark = pytest.mark.timeout(300)

STANDIN = Path(__file__).resolve().parent / "webui_standin"
SDWEBUI_SCRIPT = REPO_ROOT / "integrations" / "sdwebui" / "image_reward.py"
COMFY_PACKAGE = REPO_ROOT / "integrations" / "comfyui"
PROMPT = "two red circles on a blue background"
HEAVY_PREFIXES = ("torch", "transformers", "ray", "rayapp.model", "deepspeed", "diffusers")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def rm_model(tiny_rm_dir):
    """The library's own model: the scores both integrations must reproduce."""
    import rayapp

    return rayapp.load(tiny_rm_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def official_pt(tiny_rm_dir, tmp_path_factory) -> Path:
    """The same tiny model as an official-format ImageReward.pt (+ med_config.json, tokenizer files)."""
    import rayapp

    out = tmp_path_factory.mktemp("official")
    rayapp.load(tiny_rm_dir, device="cpu").export_official(out)
    return out / "ImageReward.pt"


@pytest.fixture(scope="module")
def webui():
    """The stand-in WebUI modules on sys.path for this file only (removed, and forgotten, afterwards)."""
    sys.path.insert(0, str(STANDIN))
    try:
        import gradio
        from modules import processing, script_callbacks, script_loading, shared

        yield SimpleNamespace(processing=processing, shared=shared, callbacks=script_callbacks,
                              loading=script_loading, gradio=gradio)
    finally:
        sys.path.remove(str(STANDIN))
        for name in list(sys.modules):
            if name.split(".")[0] in ("modules", "gradio", "image_reward"):
                del sys.modules[name]


@pytest.fixture
def sd(webui, tiny_rm_dir):
    """The A1111 script freshly loaded from its file, settings registered and pointed at the tiny model."""
    webui.shared.opts.reset()
    webui.callbacks.clear_callbacks()
    if hasattr(webui.shared, "rayapp_image_reward"):
        delattr(webui.shared, "rayapp_image_reward")
    module = webui.loading.load_module(str(SDWEBUI_SCRIPT))
    webui.callbacks.ui_settings_callback()
    webui.shared.opts.imagereward_model = str(tiny_rm_dir)
    webui.shared.opts.imagereward_device = "cpu"
    webui.shared.opts.imagereward_dtype = "float32"
    yield module
    module.unload_model()


def make_p(webui, out: Path, prompt: str = PROMPT, seed: int = 1234, batch_size: int = 2, n_iter: int = 2):
    """A txt2img processing object of the stand-in, saving under `out`."""
    return webui.processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, negative_prompt="blurry", seed=seed, batch_size=batch_size, n_iter=n_iter,
        width=64, height=64, outpath_samples=str(out / "samples"), outpath_grids=str(out / "grids"),
    )


def saved_files(out: Path) -> list[Path]:
    return sorted((out / "samples").glob("*.png")) if (out / "samples").exists() else []


@pytest.fixture(scope="module")
def comfy():
    """The ComfyUI package imported as ComfyUI imports a custom_nodes folder (its __init__.py, by path)."""
    name = "rayapp_imagereward_test_nodes"
    spec = importlib.util.spec_from_file_location(name, COMFY_PACKAGE / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def call_node(package, node: str, **inputs):
    """Run a node as ComfyUI does: inputs checked against INPUT_TYPES, getattr(node(), FUNCTION)(**inputs)."""
    cls = package.NODE_CLASS_MAPPINGS[node]
    spec = cls.INPUT_TYPES()
    assert not set(spec["required"]) - set(inputs), f"missing required inputs of {node}"
    assert not set(inputs) - set(spec["required"]) - set(spec.get("optional", {})), f"unknown inputs of {node}"
    import torch

    with torch.inference_mode():  # ComfyUI's executor runs every node inside inference mode
        outputs = getattr(cls(), cls.FUNCTION)(**inputs)
    assert isinstance(outputs, tuple) and len(outputs) == len(cls.RETURN_TYPES)
    return dict(zip(cls.RETURN_NAMES, outputs))


def comfy_batch(count: int, height: int = 64, width: int = 80, seed: int = 0):
    """A ComfyUI IMAGE batch [B, H, W, 3] in 0-1, with values where truncation and rounding to 8 bits differ."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    batch = torch.rand((count, height, width, 3), generator=gen)
    batch[:, :4] = 0.9999  # 254.97 -> 254 by SaveImage, 255 if rounded
    batch[:, -2:, :, 0] = 1.5  # out of range: clipped
    return batch


def save_image_like_comfyui(images) -> list[Image.Image]:
    """ComfyUI SaveImage's conversion, written out here as the test's oracle."""
    return [Image.fromarray(np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)) for image in images]


# ---------------------------------------------------------------- A1111 script: pure helpers
def test_sdwebui_infotext_score_goes_on_the_parameters_line(sd):
    from rayapp.serve.annotate import score_line

    text = "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"
    out = sd.infotext_with_score(text, 0.123456)
    assert out == text + ", " + score_line(0.123456)
    assert out.count("\n") == 2 and out.endswith("ImageReward Score: 0.1235")
    assert sd.infotext_with_score("just a prompt", -1.5) == "just a prompt\nImageReward Score: -1.5000"
    assert sd.infotext_with_score("", 2.0) == "ImageReward Score: 2.0000"
    assert sd.scoring_prompt("a cat, <lora:catstyle:0.8> on a sofa <hypernet:x:1>") == "a cat,  on a sofa"
    assert sd.parse_lower_limit(" -0.25 ") == -0.25 and sd.parse_lower_limit(0.5) == 0.5  # API callers send numbers


def test_client_request_chunks():
    from rayapp.serve.client import request_chunks

    assert request_chunks([], 8, 100) == []
    assert request_chunks([5] * 5, 2, 100) == [(0, 2), (2, 4), (4, 5)]
    assert request_chunks([60, 60, 10], 8, 100) == [(0, 1), (1, 3)]
    assert request_chunks([500, 1], 8, 100) == [(0, 1), (1, 2)]  # an oversize item still goes, alone


# ---------------------------------------------------------------- A1111 script: in-process
def test_sdwebui_script_ui_and_settings(sd, webui):
    script = sd.Script()
    assert script.title() == "ImageReward - generate human preference scores"
    assert script.show(False) is True and script.show(True) is True
    webui.gradio.created.clear()
    filter_box, limit_box = script.ui(is_img2img=False)
    assert (filter_box.label, filter_box.value) == ("Filter out images with low scores", False)
    assert (limit_box.label, limit_box.value) == ("Lower score limit", "0")
    buttons = [c for c in webui.gradio.created if isinstance(c, webui.gradio.Button)]
    assert [b.value for b in buttons] == ["Unload Model From Memory"]
    assert buttons[0].handlers[0][0] is sd.unload_model
    labels = webui.shared.opts.data_labels
    for key in ("imagereward_model", "imagereward_endpoint", "imagereward_device", "imagereward_dtype"):
        assert labels[key].section == ("imagereward", "ImageReward")
    assert labels["imagereward_endpoint"].default == "" and labels["imagereward_dtype"].default == "float32"


def test_sdwebui_scores_infotexts_and_png_info(sd, webui, rm_model, tmp_path):
    from rayapp.eval.generate import read_score

    p = make_p(webui, tmp_path)
    result = sd.Script().run(p, False, "0")

    # Four generations, the grid left out, best first; the scores are the library's for the same pixels.
    assert len(result.images) == 4 and result.index_of_first_image == 0
    scores = [img.info["score"] for img in result.images]
    assert scores == sorted(scores, reverse=True)
    by_generation = [img for _, img in sorted(zip(result.all_seeds, result.images), key=lambda pair: pair[0])]
    expected = rm_model.score(PROMPT, by_generation)
    assert [img.info["score"] for img in by_generation] == expected

    # Prompts and seeds follow the new order, so "reuse seed" picks the right one.
    assert sorted(result.all_seeds) == [1234, 1235, 1236, 1237]
    assert result.all_prompts == [PROMPT] * 4
    for img, text, seed in zip(result.images, result.infotexts, result.all_seeds):
        line = f"ImageReward Score: {img.info['score']:.4f}"
        assert text.endswith(", " + line) and f"Seed: {seed}," in text.rsplit("\n", 1)[-1]
        assert img.info["parameters"] == text
    assert result.info == result.infotexts[0]
    assert "kept" not in result.comments and "scored 4 images, best first" in result.comments

    # Each file is written once, by the WebUI's saver, with the score; Pillow reads it back.
    files = saved_files(tmp_path)
    assert len(files) == 4
    for img in result.images:
        path = Path(img.already_saved_as)
        assert path in files
        with Image.open(path) as saved:
            text = saved.text
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(img))
        assert text["parameters"] == img.info["parameters"]
        assert text["ImageReward Score"] == f"{img.info['score']:.4f}"
        assert read_score(path) == pytest.approx(img.info["score"], abs=5e-5)
        assert rm_model.score(PROMPT, str(path)) == pytest.approx(img.info["score"], abs=1e-5)
    assert len(list((tmp_path / "grids").glob("*.png"))) == 1  # the grid the WebUI saved is left alone


def test_sdwebui_filter_and_sort(sd, webui, tmp_path):
    first = sd.Script().run(make_p(webui, tmp_path / "a"), False, "0")
    scores = [img.info["score"] for img in first.images]
    limit = (scores[1] + scores[2]) / 2  # keeps the best two
    result = sd.Script().run(make_p(webui, tmp_path / "b"), True, f"{limit!r}")
    assert [img.info["score"] for img in result.images] == scores[:2]
    assert result.all_seeds == first.all_seeds[:2]
    assert result.infotexts == first.infotexts[:2]
    assert "kept 2 of 4 with score >=" in result.comments
    assert len(saved_files(tmp_path / "b")) == 4  # every generation is saved with its score; filtering is the view


def test_sdwebui_all_filtered_out(sd, webui, tmp_path):
    result = sd.Script().run(make_p(webui, tmp_path), True, " 1000 ")
    assert result.images == []
    assert "all 4 images scored below the lower limit 1000" in result.info
    assert "untick 'Filter out images with low scores'" in result.info
    assert result.infotexts == [result.info]
    json.loads(result.js())
    assert len(saved_files(tmp_path)) == 4


@pytest.mark.parametrize("limit, fragment", [
    ("", "is empty"), ("  ", "is empty"), (None, "is empty"), ("abc", "must be a number"),
    ("1,5", "with a dot as the decimal separator"), ("nan", "finite"), ("-inf", "finite"),
])
def test_sdwebui_invalid_limit(sd, webui, tmp_path, limit, fragment):
    with pytest.raises(ValueError, match="Lower score limit") as err:
        sd.Script().run(make_p(webui, tmp_path), True, limit)
    assert fragment in str(err.value)
    assert saved_files(tmp_path) == []  # refused before generating
    assert not hasattr(webui.shared, "rayapp_image_reward")  # and before loading the model


def test_sdwebui_limit_is_ignored_when_not_filtering(sd, webui, tmp_path):
    assert len(sd.Script().run(make_p(webui, tmp_path, batch_size=1, n_iter=1), False, "abc").images) == 1


def test_sdwebui_lazy_load_reuse_reload_ui_and_unload(sd, webui, tmp_path):
    shared = webui.shared
    assert not hasattr(shared, "rayapp_image_reward")  # importing the script and building its UI loads nothing
    sd.Script().ui(False)
    assert not hasattr(shared, "rayapp_image_reward")

    sd.Script().run(make_p(webui, tmp_path / "1", batch_size=1, n_iter=1), False, "0")
    held = shared.rayapp_image_reward
    model_ref = weakref.ref(held.model)
    sd.Script().run(make_p(webui, tmp_path / "2", batch_size=1, n_iter=1), False, "0")
    assert shared.rayapp_image_reward is held

    # Reload UI re-imports the script; the model kept on `shared` is reused.
    reloaded = webui.loading.load_module(str(SDWEBUI_SCRIPT))
    reloaded.Script().run(make_p(webui, tmp_path / "3", batch_size=1, n_iter=1), False, "0")
    assert shared.rayapp_image_reward is held

    # The Unload button's handler frees it.
    del held
    button = [c for c in webui.gradio.created if isinstance(c, webui.gradio.Button)][-1]
    assert button.handlers[0][0]() == "ImageReward: model unloaded."
    gc.collect()
    assert not hasattr(shared, "rayapp_image_reward") and model_ref() is None
    assert sd.unload_model() == "ImageReward: no model is loaded."

    # The next run loads again; a changed setting swaps the model and frees the old one.
    sd.Script().run(make_p(webui, tmp_path / "4", batch_size=1, n_iter=1), False, "0")
    old_ref = weakref.ref(shared.rayapp_image_reward.model)
    shared.opts.imagereward_dtype = "bfloat16"
    sd.Script().run(make_p(webui, tmp_path / "5", batch_size=1, n_iter=1), False, "0")
    gc.collect()
    assert old_ref() is None and shared.rayapp_image_reward.key[2] == "bfloat16"


def test_sdwebui_official_pt_checkpoint(sd, webui, rm_model, official_pt, tmp_path):
    import torch

    webui.shared.opts.imagereward_model = str(official_pt)
    webui.shared.opts.imagereward_device = "auto"
    result = sd.Script().run(make_p(webui, tmp_path, batch_size=3, n_iter=1), False, "0")
    assert f"on {'cuda:0' if torch.cuda.is_available() else 'cpu'}, float32" in result.comments
    by_seed = [img for _, img in sorted(zip(result.all_seeds, result.images), key=lambda pair: pair[0])]
    expected = rm_model.score(PROMPT, by_seed)
    assert [img.info["score"] for img in by_seed] == pytest.approx(expected, abs=1e-5)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_sdwebui_unload_returns_cuda_memory(sd, webui, tmp_path):
    import torch

    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    webui.shared.opts.imagereward_device = "cuda"
    result = sd.Script().run(make_p(webui, tmp_path, batch_size=2, n_iter=1), False, "0")
    assert "on cuda:0" in result.comments and torch.cuda.memory_allocated() > 0
    assert sd.unload_model() == "ImageReward: model unloaded."
    assert torch.cuda.memory_reserved() == before


def test_sdwebui_bad_model_setting_fails_before_generating(sd, webui, tmp_path):
    missing = tmp_path / "no-such-model"
    webui.shared.opts.imagereward_model = str(missing)
    with pytest.raises(RuntimeError, match="Settings > ImageReward") as err:
        sd.Script().run(make_p(webui, tmp_path), False, "0")
    assert str(missing) in str(err.value)
    assert saved_files(tmp_path) == []


# ---------------------------------------------------------------- A1111 script: endpoint mode
ENDPOINT_DRIVER = r"""
import json, sys
standin, script, url, out, prompt = sys.argv[1:6]
sys.path.insert(0, standin)
from modules import processing, script_callbacks, script_loading, shared

def heavy():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "ray", "deepspeed",
                                                                 "diffusers") or m.startswith("rayapp.model"))

module = script_loading.load_module(script)
script_callbacks.ui_settings_callback()
shared.opts.imagereward_endpoint = url
module.Script().ui(False)
after_import = heavy()
p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=77, batch_size=3, n_iter=3, width=64, height=64,
                                                outpath_samples=out + "/samples", outpath_grids=out + "/grids")
result = module.Script().run(p, False, "0")
print(json.dumps({"after_import": after_import, "after_run": heavy(), "comments": result.comments,
                  "scores": [img.info["score"] for img in result.images],
                  "files": [img.already_saved_as for img in result.images], "infotexts": result.infotexts}))
"""


def test_sdwebui_endpoint_mode_imports_nothing_heavy(serve_app, rm_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", ENDPOINT_DRIVER, str(STANDIN), str(SDWEBUI_SCRIPT), serve_app.url, str(tmp_path),
         PROMPT], check=False, capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["after_import"] == [] and out["after_run"] == []
    assert f"endpoint {serve_app.url}" in out["comments"]
    # Nine images went in two requests (the test endpoint takes 8 per request); the scores are the library's.
    assert len(out["scores"]) == 9 and out["scores"] == sorted(out["scores"], reverse=True)
    assert out["scores"] == pytest.approx(rm_model.score(PROMPT, out["files"]), abs=1e-5)
    for path, score, text in zip(out["files"], out["scores"], out["infotexts"]):
        with Image.open(path) as saved:
            assert saved.text["parameters"] == text and text.endswith(f"ImageReward Score: {score:.4f}")


def test_sdwebui_endpoint_unreachable_fails_before_generating(sd, webui, tmp_path):
    webui.shared.opts.imagereward_endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match="does not answer") as err:
        sd.Script().run(make_p(webui, tmp_path), False, "0")
    assert "clear Settings > ImageReward > endpoint URL" in str(err.value)
    assert saved_files(tmp_path) == []
    webui.shared.opts.imagereward_endpoint = "127.0.0.1:8000"
    with pytest.raises(ValueError, match="must look like http://"):
        sd.Script().run(make_p(webui, tmp_path), False, "0")


def test_sdwebui_scoring_failure_keeps_the_generation(sd, webui, serve_app, tmp_path):
    # The endpoint refuses an empty prompt; the prompt here is only an extra-network tag.
    webui.shared.opts.imagereward_endpoint = serve_app.url
    result = sd.Script().run(make_p(webui, tmp_path, prompt="<lora:style:1>"), False, "0")
    assert "scoring failed" in result.comments and "must not be empty" in result.comments
    assert len(result.images) == 5 and result.index_of_first_image == 1  # the WebUI's result, grid included
    files = saved_files(tmp_path)
    assert len(files) == 4  # still saved, without a score
    with Image.open(files[0]) as saved:
        assert "ImageReward Score" not in saved.text["parameters"]


# ---------------------------------------------------------------- ComfyUI nodes
def test_comfyui_node_conventions(comfy):
    assert set(comfy.NODE_CLASS_MAPPINGS) == {"ImageRewardLoader", "ImageRewardScore", "ImageRewardFilter"}
    assert comfy.NODE_DISPLAY_NAME_MAPPINGS == {"ImageRewardLoader": "ImageReward Loader",
                                                "ImageRewardScore": "ImageReward Score",
                                                "ImageRewardFilter": "ImageReward Filter"}
    for cls in comfy.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert isinstance(spec["required"], dict)
        for entry in [*spec["required"].values(), *spec.get("optional", {}).values()]:
            assert isinstance(entry, tuple) and isinstance(entry[0], (str, list))
        assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY == "ImageReward"
        assert len(getattr(cls, "OUTPUT_IS_LIST", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    score, filt = comfy.NODE_CLASS_MAPPINGS["ImageRewardScore"], comfy.NODE_CLASS_MAPPINGS["ImageRewardFilter"]
    assert score.RETURN_TYPES == ("FLOAT", "STRING") and score.OUTPUT_IS_LIST == (True, False)
    assert filt.RETURN_TYPES[:3] == ("IMAGE", "FLOAT", "BOOLEAN") and filt.OUTPUT_IS_LIST[:3] == (False, True, True)


def test_comfyui_score_equals_library_on_saveimage_pixels(comfy, rm_model, tiny_rm_dir, tmp_path):
    scorer = call_node(comfy, "ImageRewardLoader", model=str(tiny_rm_dir), device="cpu", dtype="float32")["imagereward"]
    batch = comfy_batch(4)
    out = call_node(comfy, "ImageRewardScore", imagereward=scorer, images=batch, prompt=PROMPT)

    pictures = save_image_like_comfyui(batch)
    rounded = (np.clip(batch[0].numpy(), 0, 1) * 255).round().astype(np.uint8)
    assert not np.array_equal(np.asarray(pictures[0]), rounded)  # the conversion choice matters for this batch
    assert out["scores"] == rm_model.score(PROMPT, pictures)  # same pixels, same call: identical
    paths = []
    for i, picture in enumerate(pictures):  # what SaveImage writes, scored from disk
        paths.append(tmp_path / f"ComfyUI_{i:05}_.png")
        picture.save(paths[-1])
    assert out["scores"] == pytest.approx(rm_model.score(PROMPT, [str(p) for p in paths]), abs=1e-6)

    best = max(range(4), key=lambda i: out["scores"][i])
    assert f"#1 image {best}: {out['scores'][best]:.4f}" in out["summary"] and "4 images" in out["summary"]


def test_comfyui_filter(comfy, tiny_rm_dir):
    scorer = call_node(comfy, "ImageRewardLoader", model=str(tiny_rm_dir), device="cpu", dtype="float32")["imagereward"]
    batch = comfy_batch(5, seed=3)
    scores = call_node(comfy, "ImageRewardScore", imagereward=scorer, images=batch, prompt=PROMPT)["scores"]
    order = sorted(range(5), key=lambda i: -scores[i])
    limit = (scores[order[2]] + scores[order[3]]) / 2  # three pass the limit

    out = call_node(comfy, "ImageRewardFilter", imagereward=scorer, images=batch, prompt=PROMPT,
                    lower_limit=limit, top_k=0)
    assert out["scores"] == [scores[i] for i in order[:3]]
    assert out["images"].shape == (3, 64, 80, 3) and bool((out["images"] == batch[order[:3]]).all())
    assert out["kept"] == [i in order[:3] for i in range(5)]
    assert "kept 3 of 5" in out["summary"]

    top = call_node(comfy, "ImageRewardFilter", imagereward=scorer, images=batch, prompt=PROMPT,
                    lower_limit=-100.0, top_k=2)
    assert top["scores"] == [scores[i] for i in order[:2]] and sum(top["kept"]) == 2

    none = call_node(comfy, "ImageRewardFilter", imagereward=scorer, images=batch, prompt=PROMPT,
                     lower_limit=100.0, top_k=0)
    assert none["images"].shape == (0, 64, 80, 3) and none["scores"] == [] and none["kept"] == [False] * 5
    assert "none of the 5 images" in none["summary"]


def test_comfyui_official_pt_and_errors(comfy, rm_model, official_pt, tmp_path):
    import torch

    scorer = call_node(comfy, "ImageRewardLoader", model=str(official_pt), device="cpu", dtype="float32")["imagereward"]
    batch = comfy_batch(2, height=48, width=48)
    got = call_node(comfy, "ImageRewardScore", imagereward=scorer, images=batch, prompt=PROMPT)["scores"]
    assert got == pytest.approx(rm_model.score(PROMPT, save_image_like_comfyui(batch)), abs=1e-5)

    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        call_node(comfy, "ImageRewardScore", imagereward=scorer, images=torch.rand(1, 3, 48, 48), prompt=PROMPT)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        call_node(comfy, "ImageRewardScore", imagereward=scorer, images=torch.rand(48, 48, 3), prompt=PROMPT)
    with pytest.raises(ValueError, match="prompt is empty"):
        call_node(comfy, "ImageRewardScore", imagereward=scorer, images=batch, prompt="  ")
    with pytest.raises(ValueError, match="lower_limit must be a finite number"):
        call_node(comfy, "ImageRewardFilter", imagereward=scorer, images=batch, prompt=PROMPT,
                  lower_limit=math.nan, top_k=0)
    with pytest.raises(ValueError, match="connect the output of an 'ImageReward Loader'"):
        call_node(comfy, "ImageRewardScore", imagereward="ImageReward-v1.0", images=batch, prompt=PROMPT)
    missing = tmp_path / "missing-model"
    with pytest.raises(RuntimeError, match="cannot load") as err:
        call_node(comfy, "ImageRewardLoader", model=str(missing), device="cpu", dtype="float32")
    assert str(missing) in str(err.value)
    with pytest.raises(ValueError, match="model is empty"):
        call_node(comfy, "ImageRewardLoader", model=" ", device="cpu", dtype="float32")
    with pytest.raises(RuntimeError, match="does not answer"):
        call_node(comfy, "ImageRewardLoader", model="", device="auto", dtype="float32",
                  endpoint_url=f"http://127.0.0.1:{free_port()}")


def test_comfyui_endpoint_mode(comfy, rm_model, serve_app):
    scorer = call_node(comfy, "ImageRewardLoader", model="ImageReward-v1.0", device="auto", dtype="float32",
                       endpoint_url=serve_app.url)["imagereward"]
    batch = comfy_batch(9, seed=5)  # more than the test endpoint's 8 images per request
    out = call_node(comfy, "ImageRewardScore", imagereward=scorer, images=batch, prompt=PROMPT)
    assert out["scores"] == pytest.approx(rm_model.score(PROMPT, save_image_like_comfyui(batch)), abs=1e-5)
    assert f"endpoint {serve_app.url}" in out["summary"]
