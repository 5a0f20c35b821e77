"""`rayapp generate` on the tiny SD 1.x and SDXL pipelines: AutoPipelineForText2Image loading, the score in
each PNG's text chunk (read back), sorting, filtering, and scoring through a Serve endpoint."""
from __future__ import annotations

import json

import pytest


def _pngs(directory):
    return sorted(directory.glob("000-*.png"))


def test_generate_tiny_sdxl_in_process(tiny_rm_dir, tmp_path, capsys):
    """A saved SDXL pipeline loads through AutoPipelineForText2Image; PNGs carry their score, best first."""
    from PIL import Image

    import rayapp
    from rayapp.cli import main
    from rayapp.diffusion import build_tiny_sdxl_pipeline
    from rayapp.eval.generate import read_score

    sdxl = build_tiny_sdxl_pipeline(tmp_path / "sdxl", seed=1)
    out = tmp_path / "out"
    assert main(["generate", "--pipeline", str(sdxl), "--scorer", str(tiny_rm_dir), "--prompt", "a red circle",
                 "-n", "3", "--steps", "2", "--guidance", "3", "--negative-prompt", "blue", "--keep-all",
                 "--quiet", "--out", str(out)]) == 0
    files = _pngs(out)
    assert len(files) == 3
    scores = [read_score(f) for f in files]
    assert scores == sorted(scores, reverse=True)
    text = Image.open(files[0]).text
    assert text["parameters"].startswith("a red circle\nNegative prompt: blue\n"
                                         "Steps: 2, Sampler: EulerDiscreteScheduler, CFG scale: 3, Seed: ")
    assert "Size: 64x64" in text["parameters"]
    assert rayapp.load(tiny_rm_dir).score("a red circle", [str(f) for f in files]) == pytest.approx(scores, abs=6e-5)
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["pipeline_class"] == "StableDiffusionXLPipeline" and len(manifest["kept"]) == 3
    assert (out / "contact_sheet.png").is_file()


def test_generate_tiny_sd_scored_through_serve_endpoint(serve_app, tmp_path):
    """`--endpoint URL` scores through the running Serve app (RewardClient); the stored scores equal the
    in-process scores of the saved PNGs, and --min-score filters on them."""
    import rayapp
    from rayapp.cli import main
    from rayapp.eval.generate import read_score

    base = ["generate", "--pipeline", "tiny", "--endpoint", serve_app.url, "--prompt", "one red circle", "-n", "3",
            "--steps", "2", "--seed", "4", "--quiet"]
    assert main(base + ["--keep-all", "--out", str(tmp_path / "all")]) == 0
    files = _pngs(tmp_path / "all")
    scores = [read_score(f) for f in files]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    local = rayapp.load(serve_app.model_dir).score("one red circle", [str(f) for f in files])
    assert local == pytest.approx(scores, abs=6e-5)
    manifest = json.loads((tmp_path / "all" / "generate.json").read_text())
    assert manifest["scorer"] == f"endpoint {serve_app.url}" and manifest["pipeline_class"] == "StableDiffusionPipeline"
    threshold = (scores[0] + scores[1]) / 2
    assert main(base + ["--min-score", str(threshold), "--out", str(tmp_path / "best")]) == 0
    assert [read_score(f) for f in _pngs(tmp_path / "best")] == scores[:1]


def test_pipeline_call_kwargs_refuses_a_negative_prompt_it_cannot_take():
    from rayapp.eval.generate import pipeline_call_kwargs

    class NoNegative:
        def __call__(self, prompt, num_inference_steps=1, guidance_scale=1.0):
            return None

    kwargs = pipeline_call_kwargs(NoNegative(), num_inference_steps=3, guidance_scale=2.0, height=None, width=64)
    assert kwargs == {"num_inference_steps": 3, "guidance_scale": 2.0}
    with pytest.raises(ValueError, match="takes no negative prompt"):
        pipeline_call_kwargs(NoNegative(), negative_prompt="blue")
