"""The reward objectives (ReFL, DRaFT-K, DRaFT-LV, AlignProp) on one sampled trajectory, and the pre-training
loss; usable outside Ray.

One code path samples (`sample_chain`): prompts -> the family's conditioning (rayapp.diffusion.parts) ->
Gaussian latents -> DDIM/DDPM steps 0..stop-1, each UNet call run WITH gradient from step `grad_from` on
(inputs through the scheduler's timestep VALUES, e.g. t = 1 for step 39 of 40 DDIM steps; the reference's
index/timestep bug is not copied) -> the clean-latent estimate of the last step run
    x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (v-prediction handled too)
-> VAE decode (frozen, differentiable) -> images in [0,1] -> reward r (differentiable, frozen) ->
    L_reward = mean(ReLU(lambda - r)) x grad_scale.
An objective only chooses the `GradientPlan` (where gradients flow), per update:
    refl       k ~ U{grad_step_min..grad_step_max}; steps < k without gradient; the chain stops at k.
    draft-k    the full chain; its last `draft_k` steps with gradient (K = 1 with k = N - 1 is ReFL's plan).
    draft-lv   the full chain without gradient; its final sample x0 is re-noised to the last timestep
               `draft_lv_samples` times and the last step redone with gradient on each (one batch).
    alignprop  the full chain; its last K steps with gradient, K ~ U{truncation range} per update, each such
               step checkpointed (activations recomputed in backward: memory of one UNet call per step).
The pre-training loss (paper Sec. 4.2; the reference code lacks it): image-text pairs -> VAE.encode -> z0;
t ~ U{0..T-1}; z_t = add_noise(z0, eps, t); L_pre = || eps - eps_theta(z_t, t, text) ||^2 (or v-target).
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rayapp.diffusion.parts import Conditioning, DiffusionParts

from .config import ReFLConfig


@dataclass(frozen=True)
class GradientPlan:
    """Where one update's gradient flows along a chain of N sampling steps (0-based step indices)."""

    objective: str
    grad_from: int  # first step whose UNet call carries the gradient (N: none of the chain's steps)
    stop: int  # steps run; the sample is the clean-latent estimate of step stop - 1
    checkpoint: bool = False  # recompute each gradient step's activations in backward (AlignProp)
    renoise_samples: int = 0  # DRaFT-LV: redo the last step on this many re-noisings of the final sample

    @property
    def grad_steps(self) -> int:
        """UNet calls per sample that carry the gradient (AlignProp's truncation length K)."""
        return self.renoise_samples or self.stop - self.grad_from


def gradient_plan(cfg: ReFLConfig, rng: random.Random) -> GradientPlan:
    """The objective's plan for one update (draws from `rng` where the objective is randomised)."""
    steps = cfg.num_inference_steps
    if cfg.objective == "refl":
        k = rng.randint(cfg.grad_step_min, cfg.grad_step_max)
        return GradientPlan("refl", grad_from=k, stop=k + 1)
    if cfg.objective == "draft-k":
        return GradientPlan("draft-k", grad_from=steps - cfg.draft_k, stop=steps)
    if cfg.objective == "draft-lv":
        return GradientPlan("draft-lv", grad_from=steps, stop=steps, renoise_samples=cfg.draft_lv_samples)
    if cfg.objective == "alignprop":
        low, high = cfg.alignprop_truncation_range
        k = rng.randint(low, high)
        return GradientPlan("alignprop", grad_from=steps - k, stop=steps, checkpoint=True)
    raise ValueError(f"unknown objective {cfg.objective!r}")


def predict_noise(unet, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                  guidance_scale: float, dtype: torch.dtype | None = None,
                  parts: DiffusionParts | None = None) -> torch.Tensor:
    """Denoiser output (noise, v or flow velocity) for (latents, t, text); classifier-free guidance when uncond
    is given and scale > 1; FLUX takes the scale as its guidance embedding instead.

    `dtype`: cast the inputs to the denoiser's weights' dtype (fp16 engines take no fp32 inputs)."""
    def call(x, c):
        if parts is None:
            return unet(x, t, **c.unet_kwargs()).sample
        return parts.denoise(unet, x, t, c, guidance=guidance_scale)

    if uncond is not None and guidance_scale > 1.0:
        both = torch.cat([latents, latents])
        out = call(_cast(both, dtype), _cast_cond(uncond.cat(cond), dtype))
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)
    return call(_cast(latents, dtype), _cast_cond(cond, dtype))


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None or dtype == torch.float32 else x.to(dtype)


def _cast_cond(cond: Conditioning, dtype: torch.dtype | None) -> Conditioning:
    if dtype is None or dtype == torch.float32:
        return cond
    return cond.to(dtype)


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


def step_x0(parts: DiffusionParts, sample: torch.Tensor, model_output: torch.Tensor, index: int) -> torch.Tensor:
    """The clean-latent estimate at sampling step `index`: flow matching x0 = x_t - sigma_t v; else from the
    noise / v prediction at the step's timestep."""
    scheduler = parts.scheduler
    if parts.flow_matching:
        sigma = scheduler.sigmas[index].to(device=sample.device, dtype=torch.float32)
        return sample.float() - sigma * model_output.float()
    return predicted_x0(scheduler, sample, model_output, scheduler.timesteps[index])


def noised_to_step(parts: DiffusionParts, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """`x0` noised to sampling step `index`'s level: (1 - sigma) x0 + sigma noise, or the scheduler's add_noise."""
    scheduler = parts.scheduler
    if parts.flow_matching:
        sigma = scheduler.sigmas[index].to(device=x0.device, dtype=torch.float32)
        return (1.0 - sigma) * x0 + sigma * noise
    return scheduler.add_noise(x0, noise, scheduler.timesteps[index])


def model_input(parts: DiffusionParts, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's input scaling (Euler-type epsilon samplers); flow matching feeds x_t as it is."""
    return latents if parts.flow_matching else parts.scheduler.scale_model_input(latents, t)


def negative_conditioning(parts: DiffusionParts, count: int, cfg: ReFLConfig, device: torch.device):
    """The classifier-free guidance negative when guidance is on and not a model input (FLUX), else None."""
    if cfg.guidance_scale > 1.0 and not parts.family.embedded_guidance:
        return parts.encode_negative(count, device)
    return None


def decode_to_images(parts: DiffusionParts, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0,1] (float32), differentiable through the frozen VAE decoder."""
    return parts.decode(latents)


def scheduler_step(parts: DiffusionParts, model_output, index: int, latents, cfg: ReFLConfig, generator):
    """One sampler step from step `index` to the next latents: flow-matching Euler x + (sigma_next - sigma) v
    (stateless), DDIM with cfg.eta, or DDPM."""
    scheduler = parts.scheduler
    if parts.flow_matching:
        sigma, after = (scheduler.sigmas[i].to(device=latents.device, dtype=torch.float32) for i in (index, index + 1))
        return latents.float() + (after - sigma) * model_output.float()
    t = scheduler.timesteps[index]
    kwargs = {"generator": generator}
    if cfg.scheduler == "ddim":
        kwargs["eta"] = cfg.eta
    return scheduler.step(model_output.float(), t, latents, **kwargs).prev_sample


def initial_latents(parts: DiffusionParts, seeds: list[int], device: torch.device) -> torch.Tensor:
    """Gaussian latents, one CPU generator per seed (same noise on any device / worker count)."""
    shape = (parts.latent_channels, parts.latent_size, parts.latent_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return noise.to(device) * getattr(parts.scheduler, "init_noise_sigma", 1.0)


def autocast_for(precision: str, device: torch.device):
    """torch autocast for bf16 / fp16 training, a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


@dataclass
class ChainResult:
    """What `sample_chain` returns: the last step's clean-latent estimate and the latents after that step."""

    x0: torch.Tensor  # what the objectives decode and score
    latents: torch.Tensor  # the sampler's own output (what a diffusers pipeline decodes after the last step)


def sample_chain(unet_grad, unet_nograd, parts: DiffusionParts, cond: Conditioning, uncond: Conditioning | None,
                 latents: torch.Tensor, plan: GradientPlan, cfg: ReFLConfig, device: torch.device, precision: str,
                 generator: torch.Generator) -> ChainResult:
    """Steps 0..plan.stop-1 of the sampler from `latents` (set_timesteps already called); the UNet calls from
    plan.grad_from on carry the gradient (through `unet_grad`, checkpointed if plan.checkpoint)."""
    scheduler = parts.scheduler
    dtype = parts.unet.dtype
    x0 = None
    for i in range(plan.stop):
        t = scheduler.timesteps[i]

        def denoise(z, unet, t=t):
            return predict_noise(unet, model_input(parts, z, t), t, cond, uncond, cfg.guidance_scale, dtype,
                                 parts)

        if i < plan.grad_from:
            with torch.no_grad(), autocast_for(precision, device):
                out = denoise(latents, unet_nograd)
        elif plan.checkpoint:
            out = checkpoint(denoise, latents, unet_grad, use_reentrant=False)
        else:
            out = denoise(latents, unet_grad)
        x0 = step_x0(parts, latents, out, i)
        latents = scheduler_step(parts, out, i, latents, cfg, generator)
    return ChainResult(x0=x0, latents=latents)


def renoised_last_step(unet_grad, parts: DiffusionParts, cond: Conditioning, uncond: Conditioning | None,
                       x0: torch.Tensor, samples: int, cfg: ReFLConfig, generator: torch.Generator) -> torch.Tensor:
    """DRaFT-LV: `samples` re-noisings of the final sample to the last timestep, each denoised again with
    gradient; their clean-latent estimates stacked sample-major ([samples x B, ...])."""
    last = cfg.num_inference_steps - 1
    t = parts.scheduler.timesteps[last]
    x0 = x0.detach()
    noise = torch.randn((samples, *x0.shape), generator=generator).to(x0.device)
    noisy = torch.cat([noised_to_step(parts, x0, noise[j], last) for j in range(samples)])
    batch_cond = _repeat(cond, samples)
    batch_uncond = _repeat(uncond, samples) if uncond is not None else None
    out = predict_noise(unet_grad, model_input(parts, noisy, t), t, batch_cond, batch_uncond, cfg.guidance_scale,
                        parts.unet.dtype, parts)
    return step_x0(parts, noisy, out, last)


def _repeat(cond: Conditioning, times: int) -> Conditioning:
    """A conditioning batch repeated `times` times, sample-major (matches torch.cat of `times` batches)."""
    result = cond
    for _ in range(times - 1):
        result = result.cat(cond)
    return result


def reward_loss_step(unet_grad, unet_nograd, parts: DiffusionParts, rm, prompts: list[str], cfg: ReFLConfig,
                     device: torch.device, precision: str, seed: int,
                     renoise_seed: int | None = None) -> tuple[torch.Tensor, dict]:
    """One reward loss on a batch of prompts with the configured objective; returns (loss with graph, stats).

    `seed` fixes the update's plan, initial noise and sampler noise; `renoise_seed` (default: from `seed`) the
    DRaFT-LV re-noising alone."""
    plan = gradient_plan(cfg, random.Random(seed))
    scheduler = parts.scheduler
    parts.set_timesteps(cfg.num_inference_steps, device)
    cond = parts.encode_prompts(prompts, device)
    uncond = negative_conditioning(parts, len(prompts), cfg, device)
    latents = initial_latents(parts, [seed * 1009 + i for i in range(len(prompts))], device)
    generator = torch.Generator(device=device).manual_seed(seed)
    chain = sample_chain(unet_grad, unet_nograd, parts, cond, uncond, latents, plan, cfg, device, precision,
                         generator)
    x0, scored_prompts = chain.x0, list(prompts)
    if plan.renoise_samples:
        renoise = torch.Generator().manual_seed(seed * 7919 + 1 if renoise_seed is None else renoise_seed)
        x0 = renoised_last_step(unet_grad, parts, cond, uncond, chain.x0, plan.renoise_samples, cfg, renoise)
        scored_prompts = scored_prompts * plan.renoise_samples
    rewards = rm.reward(parts.decode(x0), scored_prompts).float()
    loss = F.relu(cfg.reward_target - rewards).mean() * cfg.grad_scale
    last = min(plan.stop, cfg.num_inference_steps) - 1
    first = min(plan.grad_from, last)
    return loss, {"reward_train": float(rewards.detach().mean()), "grad_index": first,
                  "grad_timestep": int(scheduler.timesteps[first]), "grad_steps": plan.grad_steps,
                  "objective": plan.objective}


def pretrain_loss_step(unet_grad, parts: DiffusionParts, batch: dict, device: torch.device, seed: int,
                       guidance_scale: float = 1.0) -> torch.Tensor:
    """The family's own denoising loss on a batch of ("pixels" in [-1,1], "caption"): || eps (or v) - unet(z_t,
    t, text) ||^2 for SD / SDXL; for flow matching || (noise - z0) - v(z_t, sigma, text) ||^2 at a sampled sigma
    (FLUX with its guidance embedding at `guidance_scale`)."""
    scheduler = parts.scheduler
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.as_tensor(batch["pixels"]).to(device=device)
    z0 = parts.encode_images(pixels, gen)
    noise = torch.randn(z0.shape, generator=gen).to(device)
    cond = _cast_cond(parts.encode_prompts([str(c) for c in batch["caption"]], device), parts.unet.dtype)
    if parts.flow_matching:
        sigma, t = training_sigmas(parts, z0.shape[0], gen)
        sigma, t = sigma.to(device), t.to(device)
        noisy = (1.0 - sigma[:, None, None, None]) * z0 + sigma[:, None, None, None] * noise
        pred = parts.denoise(unet_grad, _cast(noisy, parts.unet.dtype), t, cond, guidance=guidance_scale)
        return F.mse_loss(pred.float(), (noise - z0).float())
    t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=gen).to(device)
    noisy = scheduler.add_noise(z0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(z0, noise, t)
    else:
        target = noise
    pred = unet_grad(_cast(noisy, parts.unet.dtype), t, **cond.unet_kwargs()).sample
    return F.mse_loss(pred.float(), target.float())


def training_sigmas(parts: DiffusionParts, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, timestep) per sample for the flow-matching loss: a uniform draw over the scheduler's training
    schedule (its 1000 sigmas with the static timestep shift, as diffusers' SD3 / FLUX training scripts)."""
    schedule = type(parts.scheduler).from_config(parts.scheduler.config)
    index = torch.randint(0, len(schedule.sigmas), (count,), generator=generator)
    sigmas = schedule.sigmas.float()[index]
    return sigmas, sigmas * schedule.config.num_train_timesteps


@torch.no_grad()
def generate(unet, parts: DiffusionParts, prompts: list[str], seeds: list[int], cfg: ReFLConfig,
             device: torch.device, precision: str) -> torch.Tensor:
    """Images in [0,1] for (prompt, seed) pairs with the full N-step sampler (fixed noise per seed), decoded
    from the sampler's final latents as a diffusers pipeline does."""
    parts.set_timesteps(cfg.num_inference_steps, device)
    cond = parts.encode_prompts(prompts, device)
    uncond = negative_conditioning(parts, len(prompts), cfg, device)
    latents = initial_latents(parts, seeds, device)
    steps = cfg.num_inference_steps
    plan = GradientPlan("sample", grad_from=steps, stop=steps)
    chain = sample_chain(unet, unet, parts, cond, uncond, latents, plan, cfg, device, precision,
                         torch.Generator(device=device).manual_seed(12345))
    return parts.decode(chain.latents)
