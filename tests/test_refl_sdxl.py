"""SDXL ReFL through `ray job submit` of jobs/refl.py on the tiny SDXL pipeline: the full UNet (ReFL objective,
the pre-training loss on, the offline preset's random-but-fixed tiny ImageReward RM as in test_refl.py) and
LoRA (the family's default; AlignProp objective; the tiny random Aesthetic scorer as the reward), submitted
together and shared by the assertions below.

Why two rewards: on the random tiny RM, LoRA on the tiny UNet's attention projections levels off about
+0.005 above the start (measured in process: lr 0.02-0.1, rank 4-32, 12-16 updates), under 3 standard
deviations of the per-image rewards (0.0077); the full UNet keeps climbing (+0.02 in 12 updates). The tiny
Aesthetic scorer's reward climbs under LoRA (+0.012 in 12 updates, 3 std = 0.0057).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from refl_support import assert_reward_rose

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
PROMPT = "one large red circle on a white background"  # an eval prompt (held out of the training prompts)
LORA_REWARD = "aesthetic:tiny"


def _job(ray_cluster, out: Path, *flags: str) -> subprocess.Popen:
    """`ray job submit ... -- python jobs/refl.py --preset offline-sdxl ...`, started (not waited for)."""
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard_url,
           "--working-dir", str(REPO), "--", sys.executable, "jobs/refl.py", "--preset", "offline-sdxl",
           "--output-dir", str(out), "--max-steps", str(STEPS), "--eval-every", "0", "--max-failures", "0", *flags]
    env = dict(ray_cluster.env)
    env.pop("RAY_ADDRESS", None)  # the job itself gets the cluster address from Ray
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def sdxl_runs(ray_cluster, tmp_path_factory):
    """{"base": tiny SDXL dir, "full": output dir, "lora": output dir} after both jobs succeeded."""
    from rayapp.data.synth import write_synthetic_set
    from rayapp.diffusion import build_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("refl_sdxl")
    base = build_tiny_sdxl_pipeline(root / "base", seed=0)
    write_synthetic_set(root / "synth", prompts=24, per_prompt=2, progress=False, overwrite=True)
    runs = {
        "full": _job(ray_cluster, root / "full", "--pretrained", str(base), "--lora-rank", "0",
                     "--pretrain-data", str(root / "synth" / "train"), "--pretrain-weight", "0.0001",
                     "--learning-rate", "0.003", "--num-workers", "2"),
        "lora": _job(ray_cluster, root / "lora", "--pretrained", str(base), "--objective", "alignprop",
                     "--alignprop-truncation-min", "1", "--alignprop-truncation-max", "4", "--pretrain-weight", "0",
                     "--reward", LORA_REWARD, "--num-workers", "1", "--train-batch-size", "4"),
    }
    for name, proc in runs.items():
        proc.wait(timeout=1500)
        output = (root / name).with_suffix(".log").read_text()
        assert proc.returncode == 0, f"{name} job failed:\n{output[-4000:]}"
    return {"base": base, "full": root / "full", "lora": root / "lora"}



def _mean_score(pipe, reward: str = "tiny") -> float:
    """The reward's mean score of two images diffusers renders itself (DDIM, 8 steps, as trained)."""
    from diffusers import DDIMScheduler

    from rayapp.refl.rewards import load_scorer

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([PROMPT] * 2, num_inference_steps=8, guidance_scale=1.0,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert images[0].size == (64, 64)
    return sum(load_scorer(reward, torch.device("cpu")).score(PROMPT, images)) / 2


def test_full_unet_raises_reward_and_exports_an_sdxl_pipeline(sdxl_runs):
    from diffusers import StableDiffusionXLPipeline

    out = sdxl_runs["full"]
    margin = assert_reward_rose(out, STEPS)
    info = json.loads((out / "final" / "refl_info.json").read_text())
    assert info["family"] == "sdxl" and info["format"] == "pipeline" and info["lora_rank"] == 0
    updates = json.loads((out / "updates.json").read_text())
    assert len(updates) == STEPS and all(u["loss_pretrain"] > 0 for u in updates)  # the pre-training loss was on
    tuned = StableDiffusionXLPipeline.from_pretrained(out / "final")
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_runs["base"])
    assert _mean_score(tuned) > _mean_score(base) + margin / 2


def test_lora_is_the_sdxl_default_raises_reward_and_loads_on_the_base(sdxl_runs):
    from diffusers import StableDiffusionXLPipeline

    out = sdxl_runs["lora"]
    margin = assert_reward_rose(out, STEPS)
    config = json.loads((out / "config.json").read_text())
    assert config["lora_rank"] == 4 and config["objective"] == "alignprop"  # LoRA without asking: SDXL's default
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_runs["base"])
    plain = _mean_score(pipe, LORA_REWARD)
    pipe.load_lora_weights(out / "final")
    assert _mean_score(pipe, LORA_REWARD) > plain + margin / 2


def test_alignprop_truncation_logged_per_update_within_range(sdxl_runs):
    updates = json.loads((sdxl_runs["lora"] / "updates.json").read_text())
    assert [u["step"] for u in updates] == list(range(STEPS))
    ks = [k for u in updates for k in u["grad_steps"]]
    assert all(u["objective"] == "alignprop" for u in updates)
    assert len(ks) == STEPS and all(1 <= k <= 4 for k in ks) and len(set(ks)) > 1
    assert all(u["grad_index"][0] == 8 - u["grad_steps"][0] for u in updates)  # 8 sampling steps in the preset
