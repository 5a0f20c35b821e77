"""The AUTOMATIC1111 WebUI script against the library's scores, run the way the WebUI runs it.

The script runs against tests/webui_standin, a stand-in of the WebUI's `modules` modelled on A1111
v1.10.1 (processing.process_images with its script hooks, override settings, saving and file names,
masks, Interrupt / Skip, img2img Batch), not the WebUI itself. It scores with a tiny checkpoint,
in-process and through the session's real Serve endpoint on loopback; endpoint mode also runs in a
Python that has only the standard library, Pillow and the stand-in (no rayapp). The ComfyUI nodes are
in tests/test_integrations_comfyui.py.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import PIL
import pytest
from conftest import REPO_ROOT, free_port
from PIL import Image

pytestmark = pytest.mark.timeout(300)

STANDIN = Path(__file__).resolve().parent / "webui_standin"
SDWEBUI_SCRIPT = REPO_ROOT / "integrations" / "sdwebui" / "image_reward.py"
PROMPT = "two red circles on a blue background"
SCORE_KEY = "ImageReward Score"


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def rm_model(tiny_rm_dir):
    """The library's own model: the scores the script must reproduce."""
    import rayapp

    return rayapp.load(tiny_rm_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def webui():
    """The stand-in WebUI modules on sys.path for this file only (removed, and forgotten, afterwards)."""
    sys.path.insert(0, str(STANDIN))
    try:
        import gradio
        from modules import img2img, processing, script_callbacks, script_loading, scripts, shared

        yield SimpleNamespace(processing=processing, shared=shared, callbacks=script_callbacks, scripts=scripts,
                              loading=script_loading, gradio=gradio, img2img=img2img)
    finally:
        sys.path.remove(str(STANDIN))
        for name in list(sys.modules):
            if name.split(".")[0] in ("modules", "gradio", "image_reward"):
                del sys.modules[name]


@pytest.fixture
def sd(webui, tiny_rm_dir):
    """The script freshly loaded from its file, settings registered, scoring in-process with the tiny model."""
    webui.shared.opts.reset()
    webui.shared.state.begin()
    webui.callbacks.clear_callbacks()
    webui.scripts.reported_errors.clear()
    if hasattr(webui.shared, "rayapp_image_reward"):
        delattr(webui.shared, "rayapp_image_reward")
    module = webui.loading.load_module(str(SDWEBUI_SCRIPT))
    webui.callbacks.ui_settings_callback()
    webui.shared.opts.imagereward_mode = "in-process"
    webui.shared.opts.imagereward_model = str(tiny_rm_dir)
    webui.shared.opts.imagereward_device = "cpu"
    webui.shared.opts.imagereward_dtype = "float32"
    yield module
    module.unload_model()
    assert webui.scripts.reported_errors == []  # no hook of the script raised into the WebUI's runner


def attach(webui, module, p, enabled=True, filter_out=False, limit=0.0, is_img2img=False):
    """Register the script in a tab's ScriptRunner as the WebUI does and give p its ui values."""
    runner = webui.scripts.ScriptRunner()
    runner.add(module.Script(), is_img2img)
    p.scripts = runner
    p.script_args = [0, enabled, filter_out, limit]  # [dropdown: None, the script's three controls]
    return p


def make_p(webui, out: Path, prompt: str = PROMPT, seed: int = 1234, batch_size: int = 2, n_iter: int = 2, **kw):
    """A txt2img processing object of the stand-in, saving under `out`."""
    return webui.processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, negative_prompt="blurry", seed=seed, batch_size=batch_size, n_iter=n_iter,
        width=64, height=64, outpath_samples=str(out / "samples"), outpath_grids=str(out / "grids"), **kw)


def generate(webui, module, p, **script_values):
    return webui.processing.process_images(attach(webui, module, p, **script_values))


def saved_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.exists() else []


def png_text(path) -> dict:
    with Image.open(path) as img:
        return dict(img.text)


def score_in(text: str) -> float:
    """The 'ImageReward Score: x' item of an infotext's parameters line."""
    line = text.rsplit("\n", 1)[-1]
    return float(line.split(f"{SCORE_KEY}: ", 1)[1].split(",")[0])


# ---------------------------------------------------------------- pure helpers
def test_sdwebui_helpers_and_in_process_requirements(sd):
    assert sd.scoring_prompt("a cat, <lora:catstyle:0.8> on a sofa <hypernet:x:1>") == "a cat,  on a sofa"
    assert sd.parse_lower_limit(" -0.25 ") == -0.25 and sd.parse_lower_limit(0.5) == 0.5
    for bad, fragment in [("", "is empty"), (None, "is empty"), ("abc", "must be a number"),
                          ("1,5", "decimal separator"), ("nan", "finite")]:
        with pytest.raises(ValueError, match=fragment):
            sd.parse_lower_limit(bad)
    assert sd.in_process_problems() == []  # this test Python meets rayapp's requirements
    # AUTOMATIC1111 v1.10.1 on its own Python and pins (launch_utils.py): every requirement is named.
    webui_pins = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "pillow": "9.5.0", "rayapp": None}
    problems = sd.in_process_problems(python=(3, 10, 6), version_of=webui_pins.get)
    assert problems == ["Python >= 3.11 (this WebUI runs 3.10.6)", "rayapp >= 0.1 (not installed)",
                        "torch >= 2.6 (this WebUI has 2.1.2+cu121)", "transformers >= 5.0 (this WebUI has 4.30.2)",
                        "pillow >= 10.0 (this WebUI has 9.5.0)"]


def test_sdwebui_in_process_refused_on_old_python_says_use_endpoint(sd, webui, tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "in_process_problems", lambda: ["Python >= 3.11 (this WebUI runs 3.10.6)"])
    result = generate(webui, sd, make_p(webui, tmp_path))
    assert result.images == [] and saved_files(tmp_path / "samples") == []  # stopped before the first batch
    assert "in-process scoring needs Python >= 3.11 (this WebUI runs 3.10.6)" in result.comments
    assert "serve run rayapp.serve.app:build_app" in result.comments and "mode to endpoint" in result.comments


def test_sdwebui_older_webui_is_refused_with_the_supported_versions(sd, webui, tmp_path, monkeypatch):
    monkeypatch.delattr(webui.scripts.ScriptRunner, "postprocess_image_after_composite")  # A1111 before 1.9
    result = generate(webui, sd, make_p(webui, tmp_path))
    assert "supports AUTOMATIC1111 v1.9.0 to v1.10.1" in result.comments and result.images == []


def test_sdwebui_script_ui_and_settings(sd, webui):
    script = sd.Script()
    assert script.show(False) is webui.scripts.AlwaysVisible and script.show(True) is webui.scripts.AlwaysVisible
    webui.gradio.created.clear()
    enabled, filter_box, limit_box = script.ui(is_img2img=False)
    assert (enabled.value, filter_box.value, limit_box.value) == (False, False, 0.0)
    assert filter_box.label == "Filter out images with low scores" and limit_box.label == "Lower score limit"
    buttons = [c for c in webui.gradio.created if isinstance(c, webui.gradio.Button)]
    assert [b.value for b in buttons] == ["Unload Model From Memory"] and buttons[0].handlers[0][0] is sd.unload_model
    labels = webui.shared.opts.data_labels
    assert labels["imagereward_mode"].default == "endpoint"
    assert labels["imagereward_endpoint"].default == "http://127.0.0.1:8000"
    assert all(labels[key].section == ("imagereward", "ImageReward") for key in sd.SETTINGS)


def test_sdwebui_disabled_changes_nothing(sd, webui, tmp_path):
    result = generate(webui, sd, make_p(webui, tmp_path), enabled=False)
    assert len(result.images) == 5 and all(SCORE_KEY not in text for text in result.infotexts)
    assert not hasattr(webui.shared, "rayapp_image_reward")  # nothing loaded


# ---------------------------------------------------------------- scoring and saving inside the generation
def test_sdwebui_scores_saved_by_the_webui_with_the_score(sd, webui, rm_model, tmp_path):
    result = generate(webui, sd, make_p(webui, tmp_path))
    # Nothing dropped: the WebUI's grid stays first; the four generations follow, best first.
    assert result.index_of_first_image == 1 and len(result.images) == 5 == len(result.infotexts)
    gens, texts = result.images[1:], result.infotexts[1:]
    scores = [float(img.info[SCORE_KEY]) for img in gens]
    assert scores == sorted(scores, reverse=True)
    assert SCORE_KEY not in result.infotexts[0]  # the grid is not scored
    by_seed = sorted(zip(result.all_seeds, gens, texts), key=lambda row: row[0])
    assert [seed for seed, _, _ in by_seed] == [1234, 1235, 1236, 1237]
    expected = rm_model.score(PROMPT, [img for _, img, _ in by_seed])
    for (seed, img, text), want in zip(by_seed, expected):
        assert f"Seed: {seed}," in text and score_in(text) == pytest.approx(want, abs=5e-5)
        assert img.info["parameters"] == text
    assert "scored 4 images, best first" in result.comments

    # The WebUI saved each image once, during generation, with the score in its infotext and own chunk.
    files = saved_files(tmp_path / "samples")
    assert len(files) == 4
    for img, text in zip(gens, texts):
        chunks = png_text(img.already_saved_as)
        assert chunks["parameters"] == text and chunks[SCORE_KEY] == img.info[SCORE_KEY]
        assert rm_model.score(PROMPT, img.already_saved_as) == pytest.approx(score_in(text), abs=5e-5)
    grid_file = next((tmp_path / "grids").rglob("*.png"))  # grid_save_to_dirs: in a dated folder
    assert SCORE_KEY not in png_text(grid_file) and SCORE_KEY not in png_text(grid_file)["parameters"]


def test_sdwebui_filter_sorts_and_keeps_everything_in_step(sd, webui, tmp_path):
    first = generate(webui, sd, make_p(webui, tmp_path / "a"), enabled=True)
    scores = [score_in(text) for text in first.infotexts[1:]]
    limit = (scores[1] + scores[2]) / 2  # keeps the best two
    result = generate(webui, sd, make_p(webui, tmp_path / "b"), filter_out=True, limit=limit)
    assert result.index_of_first_image == 0  # the grid showed dropped images: left out
    assert [score_in(text) for text in result.infotexts] == scores[:2]
    assert result.all_seeds == first.all_seeds[:2] and len(result.images) == 2
    assert "kept 2 of 4 with score >=" in result.comments
    assert len(saved_files(tmp_path / "b" / "samples")) == 4  # saving is the WebUI's: every generation


def test_sdwebui_all_filtered_out_stays_aligned(sd, webui, tmp_path):
    result = generate(webui, sd, make_p(webui, tmp_path), filter_out=True, limit=1000)
    assert result.images == [] and result.infotexts == []
    assert "all 4 images scored below the lower limit 1000" in result.info
    json.loads(result.js())
    assert len(saved_files(tmp_path / "samples")) == 4


def test_sdwebui_invalid_limit_stops_before_generating(sd, webui, tmp_path):
    result = generate(webui, sd, make_p(webui, tmp_path), filter_out=True, limit="1,5")
    assert "with a dot as the decimal separator" in result.comments and "stopped before it began" in result.comments
    assert result.images == [] and saved_files(tmp_path / "samples") == []
    assert not hasattr(webui.shared, "rayapp_image_reward")  # refused before loading the model


def test_sdwebui_filename_tokens_per_image(sd, webui, tmp_path):
    webui.shared.opts.samples_filename_pattern = "[seed]-g[generation_number]-b[batch_number]"
    generate(webui, sd, make_p(webui, tmp_path, seed=10))
    names = [path.name for path in saved_files(tmp_path / "samples")]
    assert names == ["00000-10-g1-b1.png", "00001-11-g2-b2.png", "00002-12-g3-b1.png", "00003-13-g4-b2.png"]
    assert all(SCORE_KEY in png_text(tmp_path / "samples" / name) for name in names)


def test_sdwebui_img2img_batch_saves_under_the_override_file_names(sd, webui, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for stem, colour in [("cat", "red"), ("dog", "blue")]:
        Image.new("RGB", (64, 64), colour).save(inputs / f"{stem}.png")
    webui.shared.opts.img2img_batch_use_original_name = True
    p = webui.processing.StableDiffusionProcessingImg2Img(
        prompt=PROMPT, seed=5, batch_size=2, n_iter=1, width=64, height=64,
        outpath_samples=str(tmp_path / "default"), outpath_grids=str(tmp_path / "grids"))
    attach(webui, sd, p, is_img2img=True)
    result = webui.img2img.process_batch(p, str(inputs), str(tmp_path / "out"), p.script_args)

    # The override pattern '<stem>-[generation_number]' held while the WebUI saved, with the score.
    names = [path.name for path in saved_files(tmp_path / "out")]
    assert names == ["00000-cat-1.png", "00001-cat-2.png", "00002-dog-1.png", "00003-dog-2.png"]
    for name in names:
        assert SCORE_KEY in png_text(tmp_path / "out" / name)["parameters"]
    assert webui.shared.opts.samples_filename_pattern == ""  # restored afterwards, as the WebUI does
    assert len(result.images) == len(result.infotexts)
    for img, text in zip(result.images[result.index_of_first_image:], result.infotexts[result.index_of_first_image:]):
        if SCORE_KEY in img.info:
            assert score_in(text) == float(img.info[SCORE_KEY])


@pytest.mark.parametrize("button", ["interrupt", "skip"])
def test_sdwebui_interrupt_and_skip_keep_finished_batches(sd, webui, tmp_path, button):
    p = make_p(webui, tmp_path, batch_size=2, n_iter=3)
    sample = p.sample

    def pressed_during_second_batch(seeds, prompts):
        pictures = sample(seeds, prompts)
        if p.iteration == 1:
            getattr(webui.shared.state, button)()
        return pictures

    p.sample = pressed_during_second_batch
    result = generate(webui, sd, p)
    files = saved_files(tmp_path / "samples")
    seeds_saved = sorted(int(path.name.split("-")[1]) for path in files)
    finished = [1234, 1235] if button == "interrupt" else [1234, 1235, 1238, 1239]
    assert seeds_saved == finished  # stock saving: finished batches only, each with its score
    for path in files:
        assert float(png_text(path)[SCORE_KEY]) == score_in(png_text(path)["parameters"])
    gens = result.images[result.index_of_first_image:]
    texts = result.infotexts[result.index_of_first_image:]
    assert len(gens) == len(texts) == len(finished) + 2  # the cut-short batch is shown, unscored
    unscored = [text for text in texts if SCORE_KEY not in text]
    assert len(unscored) == 2 and all(("Seed: 1236," in t or "Seed: 1237," in t) for t in unscored)
    assert "2 not scored (interrupted or skipped before finishing)" in result.comments


def test_sdwebui_inpainting_masks_pass_through_and_infotexts_pair(sd, webui, tmp_path):
    opts = webui.shared.opts
    opts.return_mask = opts.return_mask_composite = opts.save_mask = True
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    def inpaint(folder):
        return webui.processing.StableDiffusionProcessingImg2Img(
            prompt=PROMPT, seed=40, batch_size=3, n_iter=1, width=64, height=64, mask=mask,
            init_images=[Image.new("RGB", (64, 64), "white")],
            outpath_samples=str(tmp_path / folder), outpath_grids=str(tmp_path / "grids"))

    stock = generate(webui, sd, inpaint("stock"), enabled=False)
    assert len(stock.infotexts) == 1 + 3 < len(stock.images) == 1 + 9  # the WebUI's masks carry no infotext
    first = generate(webui, sd, inpaint("a"), is_img2img=True)
    scores = sorted((score_in(t) for t in first.infotexts if SCORE_KEY in t), reverse=True)
    result = generate(webui, sd, inpaint("b"), filter_out=True, limit=(scores[0] + scores[1]) / 2, is_img2img=True)

    assert len(result.images) == len(result.infotexts) == len(result.all_seeds)
    generations = [(img, text) for img, text in zip(result.images, result.infotexts) if SCORE_KEY in img.info]
    assert len(generations) == 1 and score_in(generations[0][1]) == scores[0]  # the filter kept the best
    masks = [(img, text) for img, text in zip(result.images, result.infotexts) if SCORE_KEY not in img.info]
    assert len(masks) == 6  # every mask and composite passes through, unscored and unfiltered
    for position, text in enumerate(result.infotexts):  # each image sits beside its own generation's text
        assert f"Seed: {result.all_seeds[position]}," in text
    assert [int(t.split("Seed: ")[1].split(",")[0]) for _, t in masks] == [40, 40, 41, 41, 42, 42]
    mask_files = [path for path in saved_files(tmp_path / "b") if path.stem.endswith("-mask")]
    assert len(mask_files) == 3 and all(SCORE_KEY not in png_text(path) for path in mask_files)  # no score chunk


# ---------------------------------------------------------------- in-process model lifetime
def test_sdwebui_lazy_load_reuse_reload_ui_and_unload(sd, webui, tmp_path):
    shared = webui.shared
    sd.Script().ui(False)
    assert not hasattr(shared, "rayapp_image_reward")  # importing the script and building its UI loads nothing
    generate(webui, sd, make_p(webui, tmp_path / "1", batch_size=1, n_iter=1))
    held = shared.rayapp_image_reward
    model_ref = weakref.ref(held.model)
    reloaded = webui.loading.load_module(str(SDWEBUI_SCRIPT))  # Reload UI re-imports the script
    generate(webui, reloaded, make_p(webui, tmp_path / "2", batch_size=1, n_iter=1))
    assert shared.rayapp_image_reward is held
    del held
    assert sd.unload_model() == "ImageReward: model unloaded."
    gc.collect()
    assert not hasattr(shared, "rayapp_image_reward") and model_ref() is None
    assert sd.unload_model() == "ImageReward: no model is loaded."


def test_sdwebui_bad_model_setting_stops_before_generating(sd, webui, tmp_path):
    missing = tmp_path / "no-such-model"
    webui.shared.opts.imagereward_model = str(missing)
    result = generate(webui, sd, make_p(webui, tmp_path))
    assert "Settings > ImageReward" in result.comments and str(missing) in result.comments
    assert saved_files(tmp_path / "samples") == []


# ---------------------------------------------------------------- endpoint mode
def test_sdwebui_endpoint_unreachable_stops_before_generating(sd, webui, tmp_path):
    webui.shared.opts.imagereward_mode = "endpoint"
    webui.shared.opts.imagereward_endpoint = f"http://127.0.0.1:{free_port()}"
    result = generate(webui, sd, make_p(webui, tmp_path))
    assert "does not answer" in result.comments and "serve run rayapp.serve.app:build_app" in result.comments
    assert saved_files(tmp_path / "samples") == []


def test_sdwebui_endpoint_client_retries_503_and_tolerates_extra_fields(sd):
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body, headers=()):
            data = json.dumps(body).encode()
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"models": [{"id": "m", "digest": "abc"}], "limits": {"max_images": 2}, "extra": 1})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(len(body["images"]))
            if len(calls) == 1:
                self._send(503, {"detail": "busy", "field": None}, [("Retry-After", "0")])
            else:
                self._send(200, {"scores": [float(len(calls))] * len(body["images"]), "digest": "abc",
                                 "model": "m", "request_id": "r"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        scorer = sd.EndpointScorer(f"http://127.0.0.1:{server.server_port}")
        picture = Image.new("RGB", (8, 8), "red")
        assert scorer.score_pairs(["a", "b", "c"], [picture] * 3) == [2.0, 2.0, 3.0]
        assert calls == [2, 2, 1] and scorer.where.endswith("(m)")  # 2 per request; the 503 retried
    finally:
        server.shutdown()
        server.server_close()


ENDPOINT_DRIVER = r"""
import json, sys
script, url, out, prompt = sys.argv[1:5]
try:
    import rayapp  # noqa: F401
    rayapp_importable = True
except ImportError:
    rayapp_importable = False
from modules import processing, script_callbacks, script_loading, scripts, shared

module = script_loading.load_module(script)
script_callbacks.ui_settings_callback()
shared.opts.imagereward_endpoint = url  # mode: endpoint, the default
runner = scripts.ScriptRunner()
runner.add(module.Script())
p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=77, batch_size=3, n_iter=3, width=64, height=64,
                                                outpath_samples=out + "/samples", outpath_grids=out + "/grids")
p.scripts, p.script_args = runner, [0, True, False, 0.0]
result = processing.process_images(p)
first = result.index_of_first_image
print(json.dumps({"rayapp_importable": rayapp_importable, "errors": scripts.reported_errors,
                  "modules": sorted(m.split(".")[0] for m in sys.modules), "path": sys.path,
                  "comments": result.comments, "infotexts": result.infotexts[first:],
                  "scores": [float(img.info["ImageReward Score"]) for img in result.images[first:]],
                  "files": [img.already_saved_as for img in result.images[first:]]}))
"""


def test_sdwebui_endpoint_mode_without_rayapp(serve_app, rm_model, tmp_path):
    # A Python with the standard library, Pillow and the WebUI's modules only: no site-packages, no rayapp.
    path = tmp_path / "webui_python_path"
    path.mkdir()
    pil_dir = Path(PIL.__file__).parent
    (path / "PIL").symlink_to(pil_dir)
    if (pil_dir.parent / "pillow.libs").exists():  # the wheel's bundled shared libraries, found beside PIL
        (path / "pillow.libs").symlink_to(pil_dir.parent / "pillow.libs")
    (path / "modules").symlink_to(STANDIN / "modules")
    (path / "gradio").symlink_to(STANDIN / "gradio")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PYTHONPATH"] = str(path)
    proc = subprocess.run(
        [sys.executable, "-S", "-c", ENDPOINT_DRIVER, str(SDWEBUI_SCRIPT), serve_app.url, str(tmp_path), PROMPT],
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rayapp_importable"] is False and out["errors"] == []
    assert not {"rayapp", "torch", "numpy", "transformers", "ray"} & set(out["modules"])
    assert not any("site-packages" in entry for entry in out["path"])
    assert f"endpoint {serve_app.url}" in out["comments"]
    # Nine images, each scored as it was made; the scores are the library's for the saved files.
    assert len(out["scores"]) == 9 and out["scores"] == sorted(out["scores"], reverse=True)
    assert out["scores"] == pytest.approx(rm_model.score(PROMPT, out["files"]), abs=1e-4)
    for path_, score, text in zip(out["files"], out["scores"], out["infotexts"]):
        assert png_text(path_)["parameters"] == text and score_in(text) == score


def test_sdwebui_scoring_failure_keeps_the_generation(sd, webui, serve_app, tmp_path):
    # The endpoint refuses an empty prompt; the prompt here is only an extra-network tag.
    webui.shared.opts.imagereward_mode = "endpoint"
    webui.shared.opts.imagereward_endpoint = serve_app.url
    result = generate(webui, sd, make_p(webui, tmp_path, prompt="<lora:style:1>"))
    assert "4 not scored (scoring failed: HTTP 4" in result.comments
    assert len(result.images) == 5 and result.index_of_first_image == 1  # the WebUI's result, grid included
    files = saved_files(tmp_path / "samples")
    assert len(files) == 4 and all(SCORE_KEY not in png_text(path)["parameters"] for path in files)


def test_sdwebui_script_runs_on_python_3_10():
    vermin = Path(sys.executable).with_name("vermin")
    check = [str(vermin), "-t=3.10-", "--no-tips", "--violations"]
    proc = subprocess.run([*check, str(SDWEBUI_SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The check can fail: rayapp's own client needs 3.11 (typing.Self), which is why the script does not use it.
    proc = subprocess.run([*check, str(REPO_ROOT / "rayapp" / "serve" / "client.py")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "typing.Self" in proc.stdout
