"""ReFL (reward feedback learning, SPEC 3) on Ray Train + DeepSpeed, with the paper's pre-training loss.

One optimizer update, per worker (data parallel; DeepSpeed ZeRO-2 averages gradients across workers):
  reward loss  (the reference's step, with its index/timestep bug fixed):
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
  AdamW (DeepSpeed, torch implementation), grad-norm clip, optional EMA; full UNet or LoRA.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rayapp.train.refl_config import ReFLConfig

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
RM_TINY_WORDS = (
    "a an the of on in with and one two three four red green blue yellow white black purple orange gray "
    "circle circles square squares triangle triangles small large big background photo picture cat dog"
).split()


# ------------------------------------------------------------------------------------------------------
# model pieces (usable outside Ray)
# ------------------------------------------------------------------------------------------------------
def dtype_of(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class DiffusionParts:
    """The pipeline's modules as ReFL uses them (UNet trainable, the rest frozen)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    resolution: int  # output pixels (square)
    latent_size: int  # latent pixels = resolution / vae factor
    latent_channels: int


def load_diffusion_parts(cfg: ReFLConfig, device: torch.device, frozen_dtype: torch.dtype) -> DiffusionParts:
    """Load (or build, for "tiny") the SD pipeline and split it into ReFL's parts."""
    from rayapp.diffusion.tiny import (
        load_pipeline,
        make_scheduler,
        tiny_sd_pipeline,
        vae_scale_factor,
    )

    if cfg.pretrained == "tiny":  # built in memory: transformers' save_pretrained writes only on rank 0
        pipe = tiny_sd_pipeline(seed=cfg.tiny_seed)
    else:
        pipe = load_pipeline(cfg.pretrained, dtype=torch.float32)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    factor = vae_scale_factor(vae)
    sample = unet.config.sample_size
    latent = int(sample[0] if isinstance(sample, (list, tuple)) else sample)
    vae.requires_grad_(False).eval().to(device=device, dtype=frozen_dtype)
    text_encoder.requires_grad_(False).eval().to(device=device, dtype=frozen_dtype)
    unet.to(device)
    return DiffusionParts(unet, vae, text_encoder, pipe.tokenizer, make_scheduler(cfg.scheduler, pipe.scheduler.config),
                          latent * factor, latent, int(unet.config.in_channels))


def load_reward_model(cfg: ReFLConfig, device: torch.device, dtype: torch.dtype):
    """The frozen RM in the training dtype: `cfg.reward`, or the random-but-fixed tiny RM."""
    import rayapp
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    if cfg.reward is None:
        state = torch.random.get_rng_state()
        try:
            tokenizer = cfg.reward_tokenizer or build_wordpiece_tokenizer(RM_TINY_WORDS)
            model = rayapp.create_model("tiny", tokenizer=tokenizer, seed=cfg.reward_seed)
        finally:
            torch.random.set_rng_state(state)
        model.to(device)
    else:
        model = rayapp.load(cfg.reward, device=device, tokenizer=cfg.reward_tokenizer)
    model.set_dtype(dtype if dtype != torch.float32 else None)
    model.eval().requires_grad_(False)
    return model


def encode_prompts(parts: DiffusionParts, prompts: list[str], device: torch.device) -> torch.Tensor:
    tok = parts.tokenizer(list(prompts), padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    with torch.no_grad():
        return parts.text_encoder(tok.input_ids.to(device))[0]


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


def evaluate(unet, parts: DiffusionParts, rm, cfg: ReFLConfig, device: torch.device, precision: str,
             step: int) -> tuple[dict, bytes]:
    """Held-out prompts x seeds: images, RM rewards (PIL scoring path and differentiable path), grid PNG."""
    from rayapp.train.refl_preprocess import to_pil_images
    from rayapp.train.refl_viz import png_bytes, reward_grid

    prompts = [p for p in cfg.eval_prompts for _ in cfg.eval_seeds]
    seeds = [s for _ in cfg.eval_prompts for s in cfg.eval_seeds]
    was_training = unet.training
    unet.eval()
    images = torch.cat([generate(unet, parts, prompts[i:i + 8], seeds[i:i + 8], cfg, device, precision)
                        for i in range(0, len(prompts), 8)])
    unet.train(was_training)
    with torch.no_grad():
        r_tensor = rm.reward(images, prompts).float().cpu()
    pils = to_pil_images(images)
    r_pil = rm.score_pairs(prompts, pils)
    grid = reward_grid(pils, prompts, r_pil, columns=len(cfg.eval_seeds),
                       title=f"step {step}: mean reward {sum(r_pil) / len(r_pil):+.4f}")
    metrics = {"step": step, "eval_reward": float(sum(r_pil) / len(r_pil)),
               "eval_reward_tensor": float(r_tensor.mean()),
               "eval_rewards": [round(float(r), 6) for r in r_pil]}
    return metrics, png_bytes(grid)


def add_lora(unet, cfg: ReFLConfig) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES)))


def save_final_model(unet, parts: DiffusionParts, cfg: ReFLConfig, out_dir: Path) -> Path:
    """Diffusers format: the full pipeline (full fine-tuning) or `pytorch_lora_weights.safetensors` (LoRA)."""
    from diffusers import StableDiffusionPipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.lora_rank > 0:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        StableDiffusionPipeline.save_lora_weights(save_directory=os.fspath(out_dir), unet_lora_layers=layers,
                                                  safe_serialization=True)
    else:
        pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=unet, scheduler=parts.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(os.fspath(out_dir), safe_serialization=True)
    info = {"base": cfg.pretrained, "lora_rank": cfg.lora_rank, "format": "lora" if cfg.lora_rank else "pipeline",
            "config": cfg.to_dict()}
    (out_dir / "refl_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------------------
# Ray Train worker loop
# ------------------------------------------------------------------------------------------------------
def _deepspeed_config(cfg: ReFLConfig, precision: str, world_size: int) -> dict:
    from rayapp.train.common import deepspeed_config

    config = deepspeed_config(
        micro_batch=cfg.train_batch_size, grad_accum=cfg.gradient_accumulation_steps, world_size=world_size,
        lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
        grad_clip=cfg.max_grad_norm, zero_stage=cfg.zero_stage,
        precision="bf16" if precision == "bf16" else "fp32", optimizer="AdamW",
    )
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def _is_pretrain_update(cfg: ReFLConfig, step: int) -> tuple[bool, bool]:
    """(use reward loss, use pre-training loss) for 0-based update `step`."""
    if not cfg.pretrain_enabled:
        return True, False
    hit = step % cfg.pretrain_every == 0
    if cfg.pretrain_mode == "joint":
        return True, hit
    return (not hit), hit


def _timing_and_memory(step_times: list[float], device: torch.device) -> dict:
    """Seconds per update (median excludes the first, which includes data start-up) and peak memory."""
    import statistics

    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (RSS)
    return {
        "train_step_seconds": sum(step_times) / max(1, len(step_times)),
        "train_step_seconds_median": statistics.median(step_times[1:] or step_times) if step_times else 0.0,
        "peak_memory_mb": peak_mb,
    }


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: one data-parallel ReFL worker."""
    import ray.train
    import ray.train.torch

    from rayapp.train.common import (
        DS_TAG,
        STATE_FILE,
        disable_cpu_shm_comm,
        quiet_report_log,
        resolve_precision,
    )
    from rayapp.train.refl_data import infinite_batches

    quiet_report_log()  # the [refl] lines below say what Ray Train's per-report INFO line would
    cfg = ReFLConfig.from_dict(config)
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    precision = resolve_precision(cfg.precision, use_gpu)
    frozen_dtype = dtype_of(precision)
    rank, world_size = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(cfg.seed + rank)

    parts = load_diffusion_parts(cfg, device, frozen_dtype)
    rm = load_reward_model(cfg, device, frozen_dtype)
    unet = parts.unet
    if cfg.lora_rank > 0:
        add_lora(unet, cfg)
    else:
        unet.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    import deepspeed

    if not use_gpu:
        disable_cpu_shm_comm()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=unet, model_parameters=trainable,
                                           config=_deepspeed_config(cfg, precision, world_size))
    module = engine.module
    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel([p for p in module.parameters() if p.requires_grad], decay=cfg.ema_decay)

    # ---- resume ----
    start_step, history, grids = 0, [], {}
    checkpoint = ray.train.get_checkpoint()  # a restart inside this run wins over cfg.resume_from
    if checkpoint is None and cfg.resume_from:
        checkpoint = ray.train.Checkpoint(cfg.resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            ckpt_dir = Path(ckpt_dir)
            load_path, _ = engine.load_checkpoint(os.fspath(ckpt_dir), tag=DS_TAG, load_module_strict=cfg.lora_rank == 0,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"no DeepSpeed checkpoint under {ckpt_dir}")
            state = json.loads((ckpt_dir / STATE_FILE).read_text())
            start_step, history = int(state["step"]), list(state.get("history", []))
            if ema is not None and (ckpt_dir / "ema.pt").is_file():
                ema.load_state_dict(torch.load(ckpt_dir / "ema.pt", map_location="cpu", weights_only=False))
            for png in sorted((ckpt_dir / "eval").glob("*.png")) if (ckpt_dir / "eval").is_dir() else []:
                grids[png.name] = png.read_bytes()
        if rank == 0:
            print(f"[refl] resumed at step {start_step} from {checkpoint.path}", flush=True)

    prompt_iter = infinite_batches(ray.train.get_dataset_shard("prompts"), cfg.train_batch_size, ("prompt",))
    pretrain_iter = None
    if cfg.pretrain_enabled:
        pretrain_iter = infinite_batches(ray.train.get_dataset_shard("pretrain"), cfg.pretrain_batch_size,
                                         ("pixels", "caption"))

    def trainable_params():
        return [p for p in module.parameters() if p.requires_grad]

    def run_eval(step: int) -> dict:
        if rank != 0:
            return {}
        if ema is not None:
            ema.store(trainable_params())
            ema.copy_to(trainable_params())
        try:
            metrics, png = evaluate(module, parts, rm, cfg, device, precision, step)
        finally:
            if ema is not None:
                ema.restore(trainable_params())
        grids[f"step_{step:06d}.png"] = png
        history.append({k: v for k, v in metrics.items()})
        print(f"[refl] eval step {step}: mean reward {metrics['eval_reward']:+.4f} "
              f"(tensor path {metrics['eval_reward_tensor']:+.4f})", flush=True)
        return metrics

    def report(metrics: dict, step: int, with_checkpoint: bool, final: bool = False) -> None:
        metrics = {**metrics, "step": step}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="refl-ckpt-") as tmp:
            tmp_path = Path(tmp)
            engine.save_checkpoint(os.fspath(tmp_path), tag=DS_TAG, exclude_frozen_parameters=cfg.lora_rank > 0)
            if rank == 0:
                (tmp_path / STATE_FILE).write_text(json.dumps({"step": step, "history": history}))
                (tmp_path / "eval").mkdir(exist_ok=True)
                for name, data in grids.items():
                    (tmp_path / "eval" / name).write_bytes(data)
                if ema is not None:
                    torch.save(ema.state_dict(), tmp_path / "ema.pt")
                if final:
                    if ema is not None:
                        ema.copy_to(trainable_params())
                    save_final_model(module, parts, cfg, tmp_path / "final")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    if start_step == 0 or not history:
        report(run_eval(start_step), start_step, with_checkpoint=False)

    checkpoint_every = cfg.checkpoint_every or cfg.eval_every
    running: dict[str, list[float]] = {}
    step_times: list[float] = []  # seconds per update in this run (the first includes data start-up)
    step = start_step
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        use_reward, use_pretrain = _is_pretrain_update(cfg, step)
        for micro in range(cfg.gradient_accumulation_steps):
            seed = ((cfg.seed * 1_000_003 + step) * 64 + micro) * 128 + rank
            loss = torch.zeros((), device=device)
            stats: dict = {}
            if use_reward:
                prompts = [str(p) for p in next(prompt_iter)["prompt"]]
                r_loss, stats = reward_loss_step(engine, module, parts, rm, prompts, cfg, device, precision, seed)
                loss = loss + r_loss
                stats["loss_reward"] = float(r_loss.detach())
            if use_pretrain:
                p_loss = pretrain_loss_step(engine, parts, next(pretrain_iter), device, seed + 17)
                loss = loss + cfg.pretrain_weight * p_loss
                stats["loss_pretrain"] = float(p_loss.detach())
            engine.backward(loss)
            engine.step()
            for k, v in stats.items():
                running.setdefault(k, []).append(float(v))
        if ema is not None:
            ema.step(trainable_params())
        step += 1
        step_times.append(time.perf_counter() - t0)
        if rank == 0:
            parts_txt = " ".join(f"{k}={v[-1]:.5g}" for k, v in running.items())
            print(f"[refl] step {step}/{cfg.max_steps} {time.perf_counter() - t0:.2f}s {parts_txt}", flush=True)
        is_last = step >= cfg.max_steps
        do_eval = is_last or (cfg.eval_every and step % cfg.eval_every == 0)
        do_ckpt = is_last or (checkpoint_every and step % checkpoint_every == 0)
        if do_eval or do_ckpt:
            metrics = run_eval(step) if do_eval else {}
            metrics.update({f"train_{k}": sum(v) / len(v) for k, v in running.items() if k != "grad_index"})
            metrics.update(_timing_and_memory(step_times, device))
            running = {}
            report(metrics, step, with_checkpoint=bool(do_ckpt), final=is_last)
    if start_step >= cfg.max_steps:  # nothing to do: still export the final model once
        report(run_eval(step), step, with_checkpoint=True, final=True)


# ------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------
@dataclass
class ReFLResult:
    """What a ReFL run produced (paths on the driver's machine)."""

    history: list  # eval records: step, eval_reward (PIL scoring path), eval_reward_tensor, eval_rewards
    reward_before: float | None  # mean held-out reward at the first evaluation of this run's history
    reward_after: float | None  # ... at the last
    steps: int  # optimizer updates reached
    final_dir: str | None  # diffusers pipeline dir, or LoRA weights dir
    grid_png: str | None  # the last eval grid
    curve_png: str | None  # reward curve
    checkpoint: str | None  # the last Ray Train checkpoint (pass as resume_from)
    output_dir: str = ""
    metrics: dict = field(default_factory=dict)


def pipeline_resolution_of(name: str) -> int:
    """Output resolution of a pipeline from its configs (dir or hub/cache), without loading weights."""
    if name == "tiny":
        from rayapp.diffusion.tiny import TINY_IMAGE_SIZE

        return TINY_IMAGE_SIZE
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_cfg = UNet2DConditionModel.load_config(name, subfolder="unet")
    vae_cfg = AutoencoderKL.load_config(name, subfolder="vae")
    sample = unet_cfg["sample_size"]
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def run_refl(cfg: ReFLConfig) -> ReFLResult:
    """Run ReFL on the connected Ray cluster (or a local one) and collect its outputs in cfg.output_dir."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayapp.train.common import STATE_FILE, local_ray_init
    from rayapp.train.refl_data import pretrain_dataset, prompt_dataset
    from rayapp.train.refl_viz import reward_curve

    if cfg.pretrain_enabled and not cfg.pretrain_data:
        raise ValueError("the pre-training loss is on (pretrain_weight > 0) but pretrain_data is not set; "
                         "pass an image-text Parquet set or pretrain_weight=0")
    if cfg.precision == "fp16" and not cfg.use_gpu:
        raise ValueError("precision fp16 needs use_gpu")
    local_ray_init()
    output_dir = Path(cfg.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, output_dir=os.fspath(output_dir))
    cfg.save(output_dir / "refl_config.json")
    datasets = {"prompts": prompt_dataset(cfg.prompts, cfg.prompt_column)}
    if cfg.pretrain_enabled:
        datasets["pretrain"] = pretrain_dataset(cfg.pretrain_data, pipeline_resolution_of(cfg.pretrained))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run_name or time.strftime("refl-%Y%m%d-%H%M%S"),
            storage_path=cfg.storage_path or os.fspath(output_dir / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    checkpoint = result.checkpoint
    history, final_dir, grid_png, curve_png, steps = [], None, None, None, 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            ckpt_dir = Path(ckpt_dir)
            state = json.loads((ckpt_dir / STATE_FILE).read_text())
            history, steps = state.get("history", []), int(state["step"])
            if (ckpt_dir / "final").is_dir():
                target = output_dir / "final"
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(ckpt_dir / "final", target)
                final_dir = os.fspath(target)
            if (ckpt_dir / "eval").is_dir():
                shutil.copytree(ckpt_dir / "eval", output_dir / "eval", dirs_exist_ok=True)
                pngs = sorted((output_dir / "eval").glob("step_*.png"))
                grid_png = os.fspath(pngs[-1]) if pngs else None
    if history:
        (output_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        curve_png = os.fspath(reward_curve(history, output_dir / "reward_curve.png"))
    return ReFLResult(
        history=history,
        reward_before=history[0]["eval_reward"] if history else None,
        reward_after=history[-1]["eval_reward"] if history else None,
        steps=steps, final_dir=final_dir, grid_png=grid_png, curve_png=curve_png,
        checkpoint=checkpoint.path if checkpoint is not None else None,
        output_dir=os.fspath(output_dir), metrics=dict(result.metrics or {}),
    )
