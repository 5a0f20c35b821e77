"""Flow-matching families (SD3 / SD3.5 and FLUX.1) in ReFL, on the tiny SD3 and FLUX pipelines.

Through `ray job submit` of jobs/refl.py with the `offline-sd3` / `offline-flux` presets (the offline presets'
random-but-fixed tiny ImageReward RM, the velocity pre-training loss on): LoRA (the presets' default) and the full
transformer (`--lora-rank 0`) per family, all four jobs submitted together and shared by the assertions. In
process (no Ray): the sampler against diffusers' own pipelines, DRaFT-K and AlignProp a step each, the checks
that run before any worker starts, and `rayapp generate` through AutoPipelineForText2Image.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from refl_support import assert_reward_rose, run_history

REPO = Path(__file__).resolve().parents[1]
STEPS = 16
PROMPT = "one large red circle on a white background"  # an eval prompt (held out of the training prompts)
FAMILIES = {"sd3": ("offline-sd3", "StableDiffusion3Pipeline"), "flux": ("offline-flux", "FluxPipeline")}
CPU = torch.device("cpu")


def _job(ray_cluster, out: Path, preset: str, *flags: str) -> subprocess.Popen:
    """`ray job submit ... -- python jobs/refl.py --preset PRESET ...`, started (not waited for)."""
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard_url,
           "--working-dir", str(REPO), "--", sys.executable, "jobs/refl.py", "--preset", preset,
           "--output-dir", str(out), "--max-steps", str(STEPS), "--eval-every", "0", "--max-failures", "0",
           "--num-workers", "1", "--train-batch-size", "4", *flags]
    env = dict(ray_cluster.env)
    env.pop("RAY_ADDRESS", None)  # the job itself gets the cluster address from Ray
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def flow_bases(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD3 and FLUX pipelines saved in diffusers' folder layout."""
    from rayapp.diffusion import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("flow_bases")
    return {"sd3": build_tiny_sd3_pipeline(root / "sd3", seed=0), "flux": build_tiny_flux_pipeline(root / "flux")}


@pytest.fixture(scope="module")
def flow_runs(ray_cluster, tmp_path_factory, flow_bases) -> dict[tuple[str, str], Path]:
    """{(family, "lora" | "full"): output dir} after all four jobs succeeded."""
    from rayapp.data.synth import write_synthetic_set

    root = tmp_path_factory.mktemp("refl_flow")
    write_synthetic_set(root / "synth", prompts=24, per_prompt=2, progress=False, overwrite=True)
    runs = {}
    for family, (preset, _) in FAMILIES.items():
        common = ("--pretrained", str(flow_bases[family]), "--pretrain-data", str(root / "synth" / "train"))
        runs[family, "lora"] = _job(ray_cluster, root / f"{family}-lora", preset, *common)
        runs[family, "full"] = _job(ray_cluster, root / f"{family}-full", preset, *common[:2], "--lora-rank", "0",
                                    "--pretrain-weight", "0")  # the LoRA runs cover the pre-training loss
    for (family, kind), proc in runs.items():
        proc.wait(timeout=1500)
        output = (root / f"{family}-{kind}").with_suffix(".log").read_text()
        assert proc.returncode == 0, f"{family} {kind} job failed:\n{output[-4000:]}"
        print(f"{family} {kind}: {[(h['step'], h['eval_reward']) for h in run_history(root / f'{family}-{kind}')]}")
    return {key: root / f"{key[0]}-{key[1]}" for key in runs}



def _mean_score(pipe) -> float:
    """The tiny RM's mean score of two images diffusers renders itself (8 flow-matching steps, guidance 1, as
    trained)."""
    from rayapp.refl.rewards import load_scorer

    pipe.set_progress_bar_config(disable=True)
    images = pipe([PROMPT] * 2, num_inference_steps=8, guidance_scale=1.0, height=64, width=64,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert images[0].size == (64, 64)
    return sum(load_scorer("tiny", CPU).score(PROMPT, images)) / 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_raises_reward_and_loads_with_plain_diffusers(flow_runs, flow_bases, family):
    import diffusers

    out = flow_runs[family, "lora"]
    margin = assert_reward_rose(out, STEPS)
    config = json.loads((out / "config.json").read_text())
    assert config["lora_rank"] == 4 and config["scheduler"] == "flow-euler"
    updates = json.loads((out / "updates.json").read_text())
    assert len(updates) == STEPS and all(u["loss_pretrain"] > 0 for u in updates)  # the velocity loss was on
    pipe = getattr(diffusers, FAMILIES[family][1]).from_pretrained(flow_bases[family])
    plain = _mean_score(pipe)
    pipe.load_lora_weights(out / "final")
    assert _mean_score(pipe) > plain + margin / 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetune_raises_reward_and_saves_a_pipeline(flow_runs, flow_bases, family):
    import diffusers

    out = flow_runs[family, "full"]
    margin = assert_reward_rose(out, STEPS)
    info = json.loads((out / "final" / "refl_info.json").read_text())
    assert info["family"] == family and info["format"] == "pipeline" and info["lora_rank"] == 0
    pipeline_class = getattr(diffusers, FAMILIES[family][1])
    tuned = pipeline_class.from_pretrained(out / "final")
    assert _mean_score(tuned) > _mean_score(pipeline_class.from_pretrained(flow_bases[family])) + margin / 2


def _setup(pretrained: str, **overrides):
    """(config, parts, reward) for a family's offline preset at 4 sampling steps, fp32 on the CPU."""
    from rayapp.refl.config import ReFLConfig
    from rayapp.refl.models import load_diffusion_parts
    from rayapp.refl.rewards import load_reward_model

    preset = FAMILIES[pretrained.removeprefix("tiny-")][0]
    cfg = ReFLConfig.from_preset(preset, **{"num_inference_steps": 4, "grad_step_min": 1, "grad_step_max": 3,
                                            **overrides})
    parts = load_diffusion_parts(cfg, CPU, torch.float32)
    return cfg, parts, load_reward_model(cfg, CPU, torch.float32)


@pytest.mark.parametrize("pretrained", ["tiny-sd3", "tiny-flux"])
def test_draft_k_draft_lv_and_alignprop_take_a_step(pretrained):
    """DRaFT-K (K = 2), DRaFT-LV (2 re-noisings) and AlignProp (K = 3) on a flow trajectory: a gradient on the
    LoRA weights, an AdamW step that changes them, and the plan logged."""
    from dataclasses import replace

    from rayapp.refl.models import prepare_unet_for_training
    from rayapp.refl.objective import reward_loss_step

    cfg, parts, rm = _setup(pretrained)
    unet = prepare_unet_for_training(parts.unet, cfg, parts.family.lora_targets)
    params = [p for p in unet.parameters() if p.requires_grad]
    assert params and len(params) < len(list(unet.parameters()))
    cases = (("draft-k", {"draft_k": 2}, 2, 2), ("draft-lv", {"draft_lv_samples": 2}, 2, 3),
             ("alignprop", {"alignprop_truncation_min": 3, "alignprop_truncation_max": 3}, 3, 1))
    for objective, extra, steps, first in cases:
        run = replace(cfg, objective=objective, **extra)
        optimizer = torch.optim.AdamW(params, lr=run.learning_rate)
        before = [p.detach().clone() for p in params]
        loss, stats = reward_loss_step(unet, unet, parts, rm, [PROMPT, "two small blue squares"], run, CPU, "fp32", 3)
        loss.backward()
        assert sum(float(p.grad.abs().sum()) for p in params) > 0
        optimizer.step()
        optimizer.zero_grad()
        assert any(not torch.equal(a, p) for a, p in zip(before, params))
        assert stats["grad_steps"] == steps and stats["grad_index"] == first


@pytest.mark.parametrize("pretrained,guidance,use_t5", [("tiny-sd3", 3.0, True), ("tiny-sd3", 1.0, False),
                                                        ("tiny-flux", 3.5, True)])
def test_sampler_renders_what_diffusers_renders(pretrained, guidance, use_t5):
    """Our flow sampler (timestep shift, SD3 CFG and its T5 zeros without text_encoder_3, FLUX packing, ids and
    guidance embedding, VAE shift/scale) and diffusers' own pipeline give the same images from the same noise."""
    from rayapp.diffusion import load_pipeline, parts_from_pipeline
    from rayapp.refl.objective import generate

    cfg, _, _ = _setup(pretrained, guidance_scale=guidance, use_t5=use_t5)
    pipe = load_pipeline(pretrained, use_t5=use_t5)
    parts = parts_from_pipeline(pipe, device=CPU, frozen_dtype=torch.float32, resolution=64)
    prompts = [PROMPT, "two small blue squares"]
    ours = generate(parts.unet, parts, prompts, [0, 1], cfg, CPU, "fp32")
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=guidance, height=64, width=64, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert ours.shape == theirs.shape == (2, 3, 64, 64) and float(ours.std()) > 0.01
    assert float((ours - theirs).abs().max()) < 1e-4


def test_bad_inputs_fail_before_any_worker(tmp_path, flow_bases):
    """Unsupported pipeline class (naming the families), resolutions the VAE / patches / positional grid cannot
    take, a missing text encoder, and dropping FLUX's T5: clear errors from the driver's resolve step."""
    from rayapp.refl.config import ReFLConfig
    from rayapp.refl.driver import ReFLJob

    def resolve(**values):
        preset = values.pop("preset", "offline-sd3")
        return ReFLJob().resolve(ReFLConfig.from_preset(preset, pretrain_weight=0.0, **values))

    other = tmp_path / "pixart"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ValueError, match=r"StableDiffusion3Pipeline \(sd3\), FluxPipeline \(flux\)"):
        resolve(pretrained=str(other))
    with pytest.raises(ValueError, match="multiple of 8"):
        resolve(pretrained=str(flow_bases["sd3"]), resolution=68)
    with pytest.raises(ValueError, match="positional embedding covers at most 256 px"):
        resolve(pretrained="tiny-sd3", resolution=512)
    with pytest.raises(ValueError, match="multiple of 8"):
        resolve(preset="offline-flux", resolution=60)
    with pytest.raises(ValueError, match="use_t5=false applies to SD3 only"):
        resolve(preset="offline-flux", use_t5=False)
    broken = tmp_path / "sd3-no-clip2"
    subprocess.run(["cp", "-r", str(flow_bases["sd3"]), str(broken)], check=True)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"without the text encoder\(s\) \['text_encoder_2'\]"):
        resolve(pretrained=str(broken))
    with pytest.raises(ValueError, match="'flow-euler' is for SD3 / FLUX"):
        resolve(preset="offline", pretrained="tiny", scheduler="flow-euler")
    resolved = resolve(pretrained=str(flow_bases["sd3"]), use_t5=False)
    assert (resolved.resolution, resolved.scheduler, resolved.use_t5) == (64, "flow-euler", False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_through_auto_pipeline(flow_bases, tiny_rm_dir, tmp_path, family):
    """`rayapp generate` loads a saved SD3 / FLUX pipeline with AutoPipelineForText2Image and scores its images."""
    from rayapp.cli import main
    from rayapp.eval.generate import read_score

    out = tmp_path / "out"
    assert main(["generate", "--pipeline", str(flow_bases[family]), "--scorer", str(tiny_rm_dir), "--prompt",
                 "a red circle", "-n", "2", "--steps", "2", "--guidance", "2", "--height", "64", "--width", "64",
                 "--keep-all", "--quiet", "--out", str(out)]) == 0
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["pipeline_class"] == FAMILIES[family][1] and len(manifest["kept"]) == 2
    files = sorted(out.glob("000-*.png"))
    assert len(files) == 2 and all(read_score(f) is not None for f in files)
    assert "Sampler: FlowMatchEulerDiscreteScheduler" in manifest["kept"][0]["parameters"]
