"""ReFL (issue 5): tiny SD pipeline + tiny RM, 2 CPU workers on the session's Ray head.

The reward model here is the offline preset's random tiny RM (seed 0): a random-but-fixed reward
function of (image, prompt). Its preferences mean nothing; the tests prove that the optimiser climbs it
through the sampler, the VAE decoder and the differentiable preprocessing, on held-out prompts and seeds.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Small but real (the offline preset): 8 sampling steps, gradient step drawn from [3, 7], 2 prompts per worker
# per update, 2 workers.
FAST = dict(eval_seeds=(0, 1), max_failures=0)


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory) -> Path:
    """A small synthetic image-caption set (Parquet comparison shards) for the pre-training loss."""
    from rayapp.data.synth import write_synthetic_set

    out = tmp_path_factory.mktemp("refl_synth")
    write_synthetic_set(out / "synth", prompts=24, per_prompt=2, progress=False, overwrite=True)
    return out / "synth" / "train"


def test_tiny_pipeline_roundtrip(tmp_path):
    from diffusers import StableDiffusionPipeline

    from rayapp.diffusion import build_tiny_sd_pipeline, pipeline_resolution, tiny_sd_pipeline

    path = build_tiny_sd_pipeline(tmp_path / "sd", seed=3)
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert pipeline_resolution(pipe) == 64
    image = pipe("one red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    same = tiny_sd_pipeline(seed=3)  # in memory: identical weights for the same seed
    a, b = pipe.unet.state_dict(), same.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_preprocessing_gap_measured():
    """Tensor (gradient) vs PIL (scoring) preprocessing: measured, small, and not zero where resizing."""
    from preprocess_probe import preprocessing_gap, smooth_test_images

    import rayapp
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    model = rayapp.create_model("tiny", tokenizer=build_wordpiece_tokenizer("one red circle".split()), seed=0).eval()
    same_size = preprocessing_gap(smooth_test_images(4, 64, 64), 64, model, "one red circle")
    # no resize: only the 8-bit rounding differs (<= half a level, in normalised units 0.5/255/0.2613)
    assert same_size["max_abs_pixel_diff_quantized"] < 1e-5
    assert 0 < same_size["max_abs_pixel_diff"] <= 0.5 / 255 / 0.26 + 1e-4
    assert same_size["max_abs_reward_diff"] < 1e-3
    resized = preprocessing_gap(smooth_test_images(2, 512, 512), 224)  # SD 512 px -> ImageReward 224 px
    assert resized["max_abs_pixel_diff_quantized"] > 1e-3  # the kernels really differ ...
    assert resized["mean_abs_pixel_diff"] < 0.02  # ... but on average by about one 8-bit level
    non_square = preprocessing_gap(smooth_test_images(2, 96, 128), 64, model, ["one red circle"] * 2)
    assert non_square["mean_abs_reward_diff"] < 1e-2


def _run(tmp_path, name, callbacks=(), **overrides):
    from rayapp.refl import ReFLConfig, run_refl

    cfg = ReFLConfig.from_preset("offline", **{**FAST, "output_dir": str(tmp_path / name), "run_name": name,
                                               **overrides})
    return run_refl(cfg, callbacks=callbacks)


def test_refl_raises_reward_with_pretraining_loss(ray_cluster, tmp_path, pretrain_dir):
    from diffusers import StableDiffusionPipeline

    result = _run(tmp_path, "full", max_steps=12, eval_every=0, learning_rate=3e-3, grad_scale=1.0,
                  pretrain_data=str(pretrain_dir), pretrain_weight=1e-3, pretrain_every=1)
    before, after = result.eval_history[0], result.eval_history[-1]
    assert before["step"] == 0 and after["step"] == 12 and result.steps == 12
    # "clear margin": at least 3 standard deviations of the untuned pipeline's per-image rewards
    initial = torch.tensor(before["eval_rewards"])
    margin = max(0.01, 3 * float(initial.std()))
    assert after["eval_reward"] - before["eval_reward"] > margin, (before, after, margin)
    assert result.metrics.get("train_loss_pretrain", 0) > 0  # the pre-training loss was really on
    assert Path(result.grid_png).is_file() and Path(result.curve_png).is_file()
    # the exported pipeline is the tuned one: same fixed seeds through diffusers' own sampler score higher
    from rayapp.diffusion import tiny_sd_pipeline
    from rayapp.refl.models import random_tiny_reward_model

    rm = random_tiny_reward_model(seed=0).eval()
    tuned = StableDiffusionPipeline.from_pretrained(result.final_dir)
    base = tiny_sd_pipeline(seed=0)
    prompt = "one large red circle on a white background"

    def mean_score(pipe):
        pipe.set_progress_bar_config(disable=True)
        images = pipe([prompt] * 2, num_inference_steps=8, guidance_scale=1.0,
                      generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
        return sum(rm.score(prompt, images)) / 2

    assert mean_score(tuned) > mean_score(base) + margin / 2


def test_refl_lora_saves_reloads_and_resumes(ray_cluster, tmp_path):
    from diffusers import StableDiffusionPipeline

    from rayapp.diffusion import build_tiny_sd_pipeline

    base_dir = build_tiny_sd_pipeline(tmp_path / "base", seed=0)
    common = dict(pretrained=str(base_dir), lora_rank=4, learning_rate=1e-2, grad_scale=1.0, pretrain_weight=0.0,
                  eval_every=2, eval_prompts=("one red circle",), eval_seeds=(0,))
    first = _run(tmp_path, "lora", max_steps=2, **common)
    assert first.steps == 2 and [h["step"] for h in first.eval_history] == [0, 2]
    weights = Path(first.final_dir) / "pytorch_lora_weights.safetensors"
    assert weights.is_file()
    ckpt_files = {p.name for p in Path(first.checkpoint).rglob("*") if p.is_file()}
    assert any("optim_states" in name for name in ckpt_files)  # DeepSpeed ZeRO partitions were saved

    second = _run(tmp_path, "lora_resumed", max_steps=4, resume_from=first.checkpoint, **common)
    assert second.steps == 4
    assert [h["step"] for h in second.eval_history] == [0, 2, 4]  # continued, not restarted
    assert second.completed_updates == [0, 1, 2, 3]

    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, output_type="pt")
    plain = pipe("one red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(second.final_dir)
    adapted = pipe("one red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (adapted - plain).abs().max() > 1e-4  # the LoRA weights were loaded and change the samples


def test_refl_job_via_ray_job_submit(ray_cluster, tmp_path):
    out = tmp_path / "job_out"
    cmd = [
        str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard_url,
        "--working-dir", str(REPO), "--",
        sys.executable, "jobs/refl.py", "--max-steps", "2", "--eval-every", "0", "--output-dir", str(out),
        "--pretrain-weight", "0", "--eval-seeds", "0", "--num-workers", "2",
    ]
    env = dict(ray_cluster.env)
    env.pop("RAY_ADDRESS", None)  # the job itself gets the cluster address from Ray
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=800)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    before = re.search(r"mean held-out reward before: ([-+0-9.]+)", output)
    after = re.search(r"mean held-out reward after:\s+([-+0-9.]+)", output)
    grid = re.search(r"grid PNG: (\S+)", output)
    assert before and after and grid, output[-4000:]
    assert Path(grid.group(1)).is_file()
    assert (out / "final" / "model_index.json").is_file()
    assert output.count("[refl] step 2/2") == 1  # one progress line per update, not one per log forwarder
    assert re.search(r"\[workers\] node IPs: \S+, \S+", output), output[-4000:]
    assert json.loads((out / "history.json").read_text())[-1]["step"] == 2


def test_prompt_files_read_with_ray_data(ray_cluster, tmp_path):
    """The reference's [{"text": ...}] JSON, plain text (one per line) and Parquet give the same prompts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayapp.refl.data import prompt_dataset

    prompts = ["one red circle", "two blue squares on a black background", "three small triangles"]
    (tmp_path / "p.json").write_text(json.dumps([{"text": p, "seed": i} for i, p in enumerate(prompts)]))
    (tmp_path / "p.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": prompts}), tmp_path / "p.parquet")
    for name in ("p.json", "p.txt", "p.parquet"):
        ds = prompt_dataset(str(tmp_path / name))
        assert ds.columns() == ["prompt"], name
        assert sorted(r["prompt"] for r in ds.take_all()) == sorted(prompts), name
    with pytest.raises(ValueError, match="no 'text' field"):
        (tmp_path / "bad.json").write_text(json.dumps([{"caption_x": "a"}]))
        prompt_dataset(str(tmp_path / "bad.json"))


def test_killed_worker_resumes_exactly_and_skips_a_half_written_checkpoint(ray_cluster, tmp_path):
    """Rank 1 hard-exits before update 3; a forged newer checkpoint missing a rank's marker lies in storage.
    The run restarts from the complete update-2 checkpoint: no update lost or repeated in the model's history."""
    from faults import ForgeHalfWrittenCheckpoint, KillWorkerOnce, StepLog

    steps = StepLog(tmp_path / "steps.log")
    callbacks = [ForgeHalfWrittenCheckpoint(step=2, claimed_step=5), KillWorkerOnce(3, tmp_path / "killed"), steps]
    result = _run(tmp_path, "fault", callbacks=callbacks, max_steps=6, eval_every=0, checkpoint_every=2,
                  pretrain_weight=0.0, max_failures=1, eval_prompts=("one red circle",), eval_seeds=(0,))
    assert result.steps == 6
    assert result.completed_updates == list(range(6))
    assert result.metrics["restarts"] == 1
    first, second = steps.attempts()
    assert first == [0, 1, 2]  # killed before update 3, after the checkpoint taken at 2
    assert second == [2, 3, 4, 5]  # resumed from the update-2 checkpoint, not the forged "update 5" one
    assert (Path(result.checkpoint).parent / "checkpoint_9999-forged").is_dir()


def test_pretrain_data_accepts_hugging_face_image_dicts(ray_cluster, tmp_path):
    """A `datasets`-style table (image struct {bytes, path}, caption) feeds the pre-training loss."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from rayapp.refl.data import pretrain_dataset

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (80, 48), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    images = [{"bytes": png("red"), "path": "a.png"}, {"bytes": png("blue"), "path": "b.png"}]
    pq.write_table(pa.table({"image": images, "caption": ["one red square", "one blue square"]}),
                   tmp_path / "hf.parquet")
    rows = sorted(pretrain_dataset(str(tmp_path / "hf.parquet"), resolution=32).take_all(),
                  key=lambda r: r["caption"])
    assert [r["caption"] for r in rows] == ["one blue square", "one red square"]
    assert rows[1]["pixels"].shape == (3, 32, 32)
    assert rows[1]["pixels"][0].mean() > 0.9 and rows[1]["pixels"][2].mean() < -0.9  # red in [-1, 1]
