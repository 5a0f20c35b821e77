"""Objectives (ReFL, DRaFT-K, DRaFT-LV, AlignProp), the family-as-data pipeline parts (SD 1.x, SDXL) and the
reward sums, in process on the tiny pipelines (no Ray: the math, not the runtime; tests/test_refl*.py run
the loop through Ray Train + DeepSpeed)."""
from __future__ import annotations

import copy
import random

import pytest
import torch

CPU = torch.device("cpu")
PROMPTS = ["one red circle", "two blue squares on a black background"]
FEW_STEPS = dict(num_inference_steps=4, grad_step_min=1, grad_step_max=3)


def _setup(pretrained: str, **overrides):
    """(config, parts, reward) for the offline recipe on a tiny pipeline, everything fp32 on the CPU."""
    from rayapp.refl.config import ReFLConfig
    from rayapp.refl.models import load_diffusion_parts
    from rayapp.refl.rewards import load_reward_model

    # 4 sampling steps keep each loss at a fraction of a second; the objectives' logic does not depend on N
    cfg = ReFLConfig.from_preset("offline", pretrained=pretrained, **{**FEW_STEPS, **overrides})
    parts = load_diffusion_parts(cfg, CPU, torch.float32)
    parts.unet.requires_grad_(True)
    return cfg, parts, load_reward_model(cfg, CPU, torch.float32)


def _gradient(unet, parts, rm, cfg, seed: int, renoise_seed: int | None = None) -> tuple[torch.Tensor, dict]:
    """The flattened gradient of one reward loss w.r.t. the trainable parameters, and the loss's stats."""
    from rayapp.refl.objective import reward_loss_step

    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss, stats = reward_loss_step(unet, unet, parts, rm, PROMPTS, cfg, CPU, "fp32", seed, renoise_seed=renoise_seed)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in params]), stats


def _adamw_update(unet, parts, rm, cfg, seed: int) -> torch.Tensor:
    """The parameter change of one AdamW step on the reward loss (the ReFL recipe's optimizer)."""
    params = [p for p in unet.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params])
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    _gradient(unet, parts, rm, cfg, seed)
    optimizer.step()
    return torch.cat([p.detach().flatten() for p in params]) - before


@pytest.mark.parametrize("pretrained,lora", [("tiny", False), ("tiny-sdxl", True)])
def test_draft_k1_and_refl_at_the_last_step_give_the_same_update(pretrained, lora):
    """K = 1 with ReFL's gradient step fixed at the last sampling step: one plan, the same parameter update."""
    from dataclasses import replace

    from rayapp.refl.models import add_lora

    cfg, parts, rm = _setup(pretrained, lora_rank=4 if lora else 0)
    last = cfg.num_inference_steps - 1
    refl = replace(cfg, objective="refl", grad_step_min=last, grad_step_max=last)
    draft = replace(cfg, objective="draft-k", draft_k=1)
    if lora:
        torch.manual_seed(0)
        add_lora(parts.unet, cfg)
    unet_a, unet_b = parts.unet, copy.deepcopy(parts.unet)
    update_refl = _adamw_update(unet_a, parts, rm, refl, seed=5)
    update_draft = _adamw_update(unet_b, parts, rm, draft, seed=5)
    assert update_refl.abs().max() > 0
    relative = float((update_refl - update_draft).norm() / update_refl.norm())
    assert relative <= 1e-6, relative


def test_alignprop_checkpointed_chain_matches_draft_k_and_truncation_is_in_range():
    """AlignProp with K fixed equals DRaFT-K with that K (checkpointing changes memory, not gradients); its
    truncation K is drawn uniformly in the configured range and reported with every loss."""
    from dataclasses import replace

    from rayapp.refl.objective import gradient_plan

    cfg, parts, rm = _setup("tiny", num_inference_steps=6, alignprop_truncation_min=2, alignprop_truncation_max=5)
    draws = [gradient_plan(replace(cfg, objective="alignprop"), random.Random(seed)) for seed in range(400)]
    ks = [plan.grad_steps for plan in draws]
    assert set(ks) == {2, 3, 4, 5}  # every K in range, nothing outside it
    assert all(plan.checkpoint and plan.stop == cfg.num_inference_steps for plan in draws)
    assert all(plan.grad_from == cfg.num_inference_steps - plan.grad_steps for plan in draws)

    fixed = replace(cfg, objective="alignprop", alignprop_truncation_min=3, alignprop_truncation_max=3)
    g_align, stats = _gradient(parts.unet, parts, rm, fixed, seed=2)
    assert stats["grad_steps"] == 3 and stats["grad_index"] == cfg.num_inference_steps - 3
    g_draft, _ = _gradient(parts.unet, parts, rm, replace(cfg, objective="draft-k", draft_k=3), seed=2)
    assert float((g_align - g_draft).norm() / g_draft.norm()) < 1e-5

    _, stats = _gradient(parts.unet, parts, rm, replace(cfg, objective="alignprop"), seed=11)
    assert 2 <= stats["grad_steps"] <= 5


def test_draft_lv_gradient_variance_falls_with_more_samples():
    """Over repeated re-noising draws (same trajectory), the DRaFT-LV gradient's variance falls from N=1 to N=4
    (by about 1/N: the N draws are averaged)."""
    from dataclasses import replace

    cfg, parts, rm = _setup("tiny")
    variances = {}
    for samples in (1, 4):
        lv = replace(cfg, objective="draft-lv", draft_lv_samples=samples)
        grads = torch.stack([_gradient(parts.unet, parts, rm, lv, seed=3, renoise_seed=100 + d)[0] for d in range(6)])
        variances[samples] = float(((grads - grads.mean(0)) ** 2).sum(1).mean())
    print(f"DRaFT-LV gradient variance over 6 draws: N=1 {variances[1]:.4g}, N=4 {variances[4]:.4g}, "
          f"ratio {variances[1] / variances[4]:.2f}")
    assert variances[4] < 0.5 * variances[1], variances


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("pretrained", ["tiny", "tiny-sdxl"])
def test_parts_sample_as_the_diffusers_pipeline_does(pretrained, guidance):
    """The one sampler path (family conditioning: SDXL's two encoders, pooled embedding, time ids, zeroed CFG
    negative) renders what diffusers' own pipeline renders from the same noise and scheduler."""
    from rayapp.diffusion import load_pipeline, make_scheduler, parts_from_pipeline
    from rayapp.refl.config import ReFLConfig
    from rayapp.refl.objective import generate

    cfg = ReFLConfig.from_preset("offline", pretrained=pretrained, guidance_scale=guidance)
    pipe = load_pipeline(pretrained)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    parts = parts_from_pipeline(pipe, device=CPU, frozen_dtype=torch.float32)
    ours = generate(parts.unet, parts, PROMPTS, [0, 1], cfg, CPU, "fp32")
    theirs = pipe(PROMPTS, num_inference_steps=cfg.num_inference_steps, guidance_scale=guidance,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    assert float((ours - theirs).abs().max()) < 1e-4


def test_sdxl_parts_conditioning_and_fp32_vae():
    """SDXL conditioning carries the pooled embedding and size/crop ids; in fp16 its VAE stays fp32 (the VAE
    says force_upcast), SD 1.x's does not; a resolution off the VAE grid is refused."""
    from rayapp.diffusion import load_diffusion_parts

    sdxl = load_diffusion_parts("tiny-sdxl", device=CPU, frozen_dtype=torch.float16)
    assert sdxl.family.name == "sdxl" and sdxl.vae.dtype == torch.float32 and sdxl.text_encoder.dtype == torch.float16
    cond = sdxl.encode_prompts(PROMPTS, CPU)
    assert cond.encoder_hidden_states.shape == (2, 77, 64)  # two 32-wide encoders, concatenated
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 32)
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2
    negative = sdxl.encode_negative(2, CPU)
    assert not negative.encoder_hidden_states.any() and not negative.added_cond_kwargs["text_embeds"].any()
    sd = load_diffusion_parts("tiny", device=CPU, frozen_dtype=torch.float16)
    assert sd.family.name == "sd" and sd.vae.dtype == torch.float16
    assert not sd.encode_prompts(PROMPTS, CPU).added_cond_kwargs
    bigger = load_diffusion_parts("tiny-sdxl", device=CPU, frozen_dtype=torch.float32, resolution=96)
    assert bigger.latent_size == 24 and bigger.encode_prompts(["a"], CPU).added_cond_kwargs["time_ids"][0, 0] == 96
    with pytest.raises(ValueError, match="multiple of its VAE factor 4"):
        load_diffusion_parts("tiny", device=CPU, frozen_dtype=torch.float32, resolution=66)


def test_reward_specs_and_every_scorer_carries_a_gradient():
    """`--reward` weighted sums parse; ImageReward (tiny), CLIP, BLIP and Aesthetic all have a differentiable
    path to the image; the sum's tensor path agrees with its PIL scoring path."""
    from rayapp.refl.preprocess import to_pil_images
    from rayapp.refl.rewards import (
        RewardTerm,
        WeightedReward,
        load_scorer,
        parse_reward,
    )

    assert parse_reward("imagereward:1.0,aesthetic:0.1") == [RewardTerm("imagereward", 1.0),
                                                              RewardTerm("aesthetic", 0.1)]
    assert parse_reward("aesthetic:tiny:0.5,CLIP:tiny") == [RewardTerm("aesthetic:tiny", 0.5),
                                                             RewardTerm("CLIP:tiny", 1.0)]
    assert parse_reward(None) == [RewardTerm("tiny", 1.0)]
    with pytest.raises(ValueError, match="empty term"):
        parse_reward("imagereward:1.0,")

    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    sources = ["tiny", "CLIP:tiny", "BLIP:tiny", "Aesthetic:tiny"]
    scorers = [load_scorer(s, CPU) for s in sources]
    for source, scorer in zip(sources, scorers):
        images.grad = None
        WeightedReward([scorer], [1.0], [source]).reward(images, PROMPTS).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0, source
    total = WeightedReward(scorers[:1] + scorers[3:], [1.0, 0.1], ["tiny", "Aesthetic:tiny"])
    with torch.no_grad():
        tensor_path = total.reward(images, PROMPTS)
    pil_path = torch.tensor(total.score_pairs(PROMPTS, to_pil_images(images)))
    assert torch.allclose(tensor_path, pil_path, atol=5e-3)
