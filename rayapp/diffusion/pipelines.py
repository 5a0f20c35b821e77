"""Loading Stable Diffusion pipelines (hub name, local folder, or the offline "tiny" one) and their geometry."""
from __future__ import annotations

import os
from pathlib import Path


def make_scheduler(kind: str = "ddim", config: dict | None = None):
    """A DDIM or DDPM scheduler; `config` (e.g. a pipeline's scheduler.config) overrides SD's defaults."""
    from diffusers import DDIMScheduler, DDPMScheduler

    base = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    if config is not None:
        base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    kind = kind.lower()
    if kind == "ddim":
        return DDIMScheduler.from_config(base)
    if kind == "ddpm":
        return DDPMScheduler.from_config(base)
    raise ValueError(f"unknown scheduler {kind!r}; use 'ddim' or 'ddpm'")


def pipeline_resolution(pipe_or_unet_vae) -> int:
    """Output resolution in pixels = UNet sample size (latent pixels) x VAE downsampling factor."""
    unet = getattr(pipe_or_unet_vae, "unet", None)
    vae = getattr(pipe_or_unet_vae, "vae", None)
    if unet is None or vae is None:
        unet, vae = pipe_or_unet_vae
    sample = unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * vae_scale_factor(vae)


def vae_scale_factor(vae) -> int:
    """Latent downsampling factor of an AutoencoderKL: 2 ** (levels - 1) (8 for SD, 4 for the tiny VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_pipeline(name_or_dir: str | os.PathLike, *, dtype=None, device=None, scheduler: str | None = None):
    """Load a StableDiffusionPipeline from a local directory or a Hugging Face hub name.

    name_or_dir: a `save_pretrained` directory (e.g. from `build_tiny_sd_pipeline`), or a hub name such as
      "CompVis/stable-diffusion-v1-4" (goes through the HF cache; `HF_HUB_OFFLINE=1` is respected).
      The special name "tiny" builds the tiny pipeline (seed 0) in memory.
    dtype: torch dtype or its name ("float32", "bfloat16", "float16"); default float32.
    device: where to move the pipeline; default CPU.
    scheduler: replace the pipeline's scheduler with "ddim" or "ddpm" (keeping its beta schedule).
    The safety checker is not loaded (it scores nothing we need and doubles the download).
    """
    import torch
    from diffusers import StableDiffusionPipeline

    from rayapp.model.dtypes import resolve_dtype

    from .tiny import tiny_sd_pipeline

    dtype = resolve_dtype(dtype) if dtype is not None else torch.float32
    source = os.fspath(name_or_dir)
    if source == "tiny":
        pipe = tiny_sd_pipeline(seed=0, scheduler=scheduler or "ddim").to(dtype=dtype)
        return pipe.to(device) if device is not None else pipe
    local = Path(source).is_dir()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, EnvironmentError) as err:
        hint = "" if local else (
            " It is not a local directory; as a hub name it needs network access or a cached copy"
            " (HF_HUB_OFFLINE=1 forbids downloads)."
        )
        raise OSError(f"cannot load the Stable Diffusion pipeline {source!r}.{hint}") from err
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
