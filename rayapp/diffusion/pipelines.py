"""Loading diffusers text-to-image pipelines (hub name, local folder, or an offline tiny one) and their geometry."""
from __future__ import annotations

import os
from pathlib import Path

from .schedulers import make_scheduler
from .tiny import TINY_IMAGE_SIZE, TINY_VAE_CHANNELS, tiny_sd_pipeline
from .tiny_flux import tiny_flux_pipeline
from .tiny_sd3 import tiny_sd3_pipeline
from .tiny_sdxl import tiny_sdxl_pipeline

# Names that build a tiny random-weight pipeline in memory instead of loading one (tiny*.py), and their classes.
TINY_CLASSES = {"tiny": "StableDiffusionPipeline", "tiny-sdxl": "StableDiffusionXLPipeline",
                "tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}
TINY_PIPELINES = tuple(TINY_CLASSES)


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


def tiny_geometry(name: str) -> tuple[int, int, dict]:
    """(native output pixels, VAE factor, denoiser config) of a tiny pipeline name, without building it."""
    if name not in TINY_CLASSES:
        raise ValueError(f"unknown tiny pipeline {name!r}; known: {', '.join(TINY_PIPELINES)}")
    factor = 2 ** (len(TINY_VAE_CHANNELS) - 1)
    config = {"patch_size": 2, "pos_embed_max_size": 32} if name == "tiny-sd3" else {}
    return TINY_IMAGE_SIZE, factor, config


def tiny_pipeline(name: str, seed: int = 0, scheduler: str | None = None, use_t5: bool = True):
    """The tiny pipeline a name in TINY_PIPELINES stands for, built in memory (SD3: without T5 if not use_t5).
    The flow-matching ones keep their own scheduler (`scheduler` must be None)."""
    if name in ("tiny-sd3", "tiny-flux"):
        if scheduler is not None:
            raise ValueError(f"{name} samples with its flow-matching Euler scheduler, not {scheduler!r}")
        if name == "tiny-sd3":
            return tiny_sd3_pipeline(seed=seed, with_t5=use_t5)
        return tiny_flux_pipeline(seed=seed)
    if name == "tiny":
        return tiny_sd_pipeline(seed=seed, scheduler=scheduler or "ddim")
    if name == "tiny-sdxl":
        pipe = tiny_sdxl_pipeline(seed=seed)
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        return pipe
    raise ValueError(f"unknown tiny pipeline {name!r}; known: {', '.join(TINY_PIPELINES)}")


def pipeline_class_name(name_or_dir: str | os.PathLike) -> str:
    """The diffusers pipeline class a pipeline is saved as (model_index.json), without loading weights."""
    source = os.fspath(name_or_dir)
    if source in TINY_CLASSES:
        return TINY_CLASSES[source]
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(source)
    except OSError as err:
        raise OSError(f"cannot read the pipeline config of {source!r}{_hub_hint(source)}") from err
    return str(config["_class_name"])


def _hub_hint(source: str) -> str:
    if Path(source).is_dir():
        return " (a local directory without a diffusers model_index.json?)"
    return (" (not a local directory; as a hub name it needs network access or a cached copy, and "
            "HF_HUB_OFFLINE=1 forbids downloads)")


def load_pipeline(name_or_dir: str | os.PathLike, *, dtype=None, device=None, scheduler: str | None = None,
                  seed: int = 0, use_t5: bool = True):
    """Load any diffusers text-to-image pipeline (AutoPipelineForText2Image: SD 1.x/2.x, SDXL, SD3, Flux, ...).

    name_or_dir: a `save_pretrained` directory, a Hugging Face hub name (through the HF cache;
      `HF_HUB_OFFLINE=1` is respected), or a name in TINY_PIPELINES ("tiny", "tiny-sdxl", "tiny-sd3",
      "tiny-flux": a tiny random-weight pipeline with weights from `seed`, built in memory).
    dtype: torch dtype or its name ("float32", "bfloat16", "float16"); default float32.
    device: where to move the pipeline; default CPU.
    scheduler: replace the pipeline's scheduler with "ddim" or "ddpm" (keeping its beta schedule).
    use_t5: False loads an SD3 pipeline without its optional T5 encoder (text_encoder_3 / tokenizer_3 = None:
      diffusers then feeds zeros for the T5 states).
    A safety checker is not loaded (it scores nothing we need and doubles the download).
    """
    import torch
    from diffusers import AutoPipelineForText2Image

    from rayapp.model.dtypes import resolve_dtype

    dtype = resolve_dtype(dtype) if dtype is not None else torch.float32
    source = os.fspath(name_or_dir)
    if source in TINY_PIPELINES:
        pipe = tiny_pipeline(source, seed=seed, scheduler=scheduler, use_t5=use_t5)
        if dtype != torch.float32:  # built in fp32
            pipe = pipe.to(dtype=dtype)
    else:
        kwargs = {}
        class_name = pipeline_class_name(source)
        if class_name == "StableDiffusionPipeline":
            kwargs = {"safety_checker": None, "requires_safety_checker": False}
        if not use_t5 and class_name == "StableDiffusion3Pipeline":
            kwargs = {"text_encoder_3": None, "tokenizer_3": None}
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype, **kwargs)
        except OSError as err:
            raise OSError(f"cannot load the diffusers pipeline {source!r}{_hub_hint(source)}") from err
        except ValueError as err:  # AutoPipeline names the classes it maps when it has no text-to-image one
            raise ValueError(f"{source!r} is not a text-to-image pipeline diffusers' AutoPipelineForText2Image "
                             f"knows: {err}") from err
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
