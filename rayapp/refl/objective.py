"""The ReFL objective (SPEC 3) and the sampler it differentiates through, usable outside Ray.

  reward loss (the reference's step, with its index/timestep bug fixed):
    prompts -> CLIP text encoder (frozen) -> Gaussian latents; scheduler.set_timesteps(N);
    k ~ U{grad_step_min..grad_step_max}; steps 0..k-1 without gradient; at step k the UNet runs WITH
    gradient on the scheduler's timestep VALUE t_k (e.g. 26 of 1000 for k = 39 of 40 DDIM steps, not 39);
    x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)  (v-prediction handled too);
    image = clamp(VAE.decode(x0 / scaling) / 2 + 1/2, 0, 1) (VAE frozen, differentiable);
    r = RM.reward(image, prompt) (differentiable `preprocess_tensor`, RM frozen, training dtype);
    L_reward = mean(ReLU(lambda - r)) x grad_scale.
  pre-training loss (paper Sec. 4.2; the reference code lacks it):
    image-text pairs -> VAE.encode -> z0 x scaling; t ~ U{0..T-1}; z_t = add_noise(z0, eps, t);
    L_pre = || eps - eps_theta(z_t, t, text) ||^2 (or v-target), weighted by pretrain_weight and either added
    to the reward loss (joint) or given its own updates (alternate).
"""
from __future__ import annotations

import random
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .config import ReFLConfig
from .models import DiffusionParts, encode_prompts


def predict_noise(unet, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                  guidance_scale: float) -> torch.Tensor:
    """UNet output for (latents, t, text); classifier-free guidance when uncond is given and scale > 1."""
    if uncond is not None and guidance_scale > 1.0:
        both = torch.cat([latents, latents])
        out = unet(both, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)
    return unet(latents, t, encoder_hidden_states=cond).sample


def predicted_x0(scheduler, sample: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean-latent estimate at timestep value t (differentiable; epsilon / v_prediction / sample)."""
    abar = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)[t.long()]
    sqrt_abar, sqrt_1m = abar.sqrt(), (1.0 - abar).sqrt()
    kind = scheduler.config.prediction_type
    sample32, out32 = sample.float(), model_output.float()
    if kind == "epsilon":
        return (sample32 - sqrt_1m * out32) / sqrt_abar
    if kind == "v_prediction":
        return sqrt_abar * sample32 - sqrt_1m * out32
    if kind == "sample":
        return out32
    raise ValueError(f"unsupported prediction_type {kind!r}")


def decode_to_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0,1] (float32), differentiable through the frozen VAE decoder."""
    latents = latents / vae.config.scaling_factor
    decoded = vae.decode(latents.to(vae.dtype)).sample
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def scheduler_step(scheduler, model_output, t, latents, cfg: ReFLConfig, generator):
    """One sampler step to the previous latents (DDIM with cfg.eta, or DDPM)."""
    kwargs = {"generator": generator}
    if cfg.scheduler == "ddim":
        kwargs["eta"] = cfg.eta
    return scheduler.step(model_output, t, latents, **kwargs).prev_sample


def initial_latents(parts: DiffusionParts, seeds: list[int], device: torch.device) -> torch.Tensor:
    """Gaussian latents, one CPU generator per seed (same noise on any device / worker count)."""
    shape = (parts.latent_channels, parts.latent_size, parts.latent_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return noise.to(device) * parts.scheduler.init_noise_sigma


def autocast_for(precision: str, device: torch.device):
    """torch autocast for bf16 / fp16 training, a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


def reward_loss_step(unet_grad, unet_nograd, parts: DiffusionParts, rm, prompts: list[str], cfg: ReFLConfig,
                     device: torch.device, precision: str, seed: int) -> tuple[torch.Tensor, dict]:
    """One ReFL reward loss on a batch of prompts; returns (loss with graph, stats)."""
    rng = random.Random(seed)
    grad_index = rng.randint(cfg.grad_step_min, cfg.grad_step_max)
    scheduler = parts.scheduler
    scheduler.set_timesteps(cfg.num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    cond = encode_prompts(parts, prompts, device)
    uncond = encode_prompts(parts, [""] * len(prompts), device) if cfg.guidance_scale > 1.0 else None
    latents = initial_latents(parts, [seed * 1009 + i for i in range(len(prompts))], device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad(), autocast_for(precision, device):
        for t in timesteps[:grad_index]:
            out = predict_noise(unet_nograd, scheduler.scale_model_input(latents, t), t, cond, uncond,
                                cfg.guidance_scale)
            latents = scheduler_step(scheduler, out, t, latents, cfg, gen)
    t = timesteps[grad_index]
    out = predict_noise(unet_grad, scheduler.scale_model_input(latents, t), t, cond, uncond, cfg.guidance_scale)
    x0 = predicted_x0(scheduler, latents, out, t)
    images = decode_to_images(parts.vae, x0)
    rewards = rm.reward(images, prompts).float()
    loss = F.relu(cfg.reward_target - rewards).mean() * cfg.grad_scale
    return loss, {"reward_train": float(rewards.detach().mean()), "grad_index": grad_index,
                  "grad_timestep": int(t)}


def pretrain_loss_step(unet_grad, parts: DiffusionParts, batch: dict, device: torch.device, seed: int) -> torch.Tensor:
    """Denoising loss || target - unet(z_t, t, text) ||^2 on a batch of ("pixels" in [-1,1], "caption")."""
    scheduler = parts.scheduler
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.as_tensor(batch["pixels"]).to(device=device, dtype=parts.vae.dtype)
    with torch.no_grad():
        dist = parts.vae.encode(pixels).latent_dist
        eps_vae = torch.randn(dist.mean.shape, generator=gen).to(device=device, dtype=dist.mean.dtype)
        z0 = (dist.mean + dist.std * eps_vae).float() * parts.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=gen).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=gen).to(device)
    noisy = scheduler.add_noise(z0, noise, t)
    cond = encode_prompts(parts, [str(c) for c in batch["caption"]], device)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(z0, noise, t)
    else:
        target = noise
    pred = unet_grad(noisy, t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def generate(unet, parts: DiffusionParts, prompts: list[str], seeds: list[int], cfg: ReFLConfig,
             device: torch.device, precision: str) -> torch.Tensor:
    """Images in [0,1] for (prompt, seed) pairs with the full N-step sampler (fixed noise per seed)."""
    scheduler = parts.scheduler
    scheduler.set_timesteps(cfg.num_inference_steps, device=device)
    cond = encode_prompts(parts, prompts, device)
    uncond = encode_prompts(parts, [""] * len(prompts), device) if cfg.guidance_scale > 1.0 else None
    latents = initial_latents(parts, seeds, device)
    gen = torch.Generator(device=device).manual_seed(12345)
    with autocast_for(precision, device):
        for t in scheduler.timesteps:
            out = predict_noise(unet, scheduler.scale_model_input(latents, t), t, cond, uncond, cfg.guidance_scale)
            latents = scheduler_step(scheduler, out, t, latents, cfg, gen)
    return decode_to_images(parts.vae, latents)


