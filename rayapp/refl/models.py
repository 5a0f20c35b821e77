"""The models ReFL works with: the diffusion pipeline's parts (the denoiser trained, the rest frozen; SD 1.x/2.x,
SDXL, SD3 / SD3.5 or FLUX.1, see rayapp.diffusion.parts), LoRA adapters, and the exported result. Rewards live
in `rewards.py`."""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch

from rayapp.diffusion.parts import Conditioning, DiffusionParts

from .config import ReFLConfig
from .rewards import load_reward_model, random_tiny_reward_model

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")

__all__ = ["LORA_TARGET_MODULES", "Conditioning", "DiffusionParts", "add_lora", "encode_prompts",
           "load_diffusion_parts", "load_reward_model", "random_tiny_reward_model", "save_final_model"]


def load_diffusion_parts(cfg: ReFLConfig, device: torch.device, frozen_dtype: torch.dtype) -> DiffusionParts:
    """Load (or build, for the tiny names) the pipeline and split it into ReFL's parts."""
    from rayapp.diffusion.parts import load_diffusion_parts as load_parts

    scheduler = "ddim" if cfg.scheduler == "flow-euler" else cfg.scheduler  # flow families keep their own sampler
    return load_parts(cfg.pretrained, device=device, frozen_dtype=frozen_dtype, scheduler=scheduler,
                      resolution=cfg.resolution, tiny_seed=cfg.tiny_seed, use_t5=cfg.use_t5)


def encode_prompts(parts: DiffusionParts, prompts: list[str], device: torch.device) -> Conditioning:
    """The UNet's conditioning for `prompts` (frozen text encoders, no gradient)."""
    return parts.encode_prompts(prompts, device)


def prepare_unet_for_training(unet, cfg: ReFLConfig, targets: tuple[str, ...] = LORA_TARGET_MODULES):
    """LoRA adapters on `targets` (lora_rank > 0) or the whole denoiser trainable, gradient checkpointing if asked,
    train mode."""
    if cfg.lora_rank is None:
        raise ValueError("lora_rank must be resolved before training (see rayapp.refl.driver.resolve)")
    if cfg.lora_rank > 0:
        add_lora(unet, cfg, targets)
    else:
        unet.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train()


def add_lora(unet, cfg: ReFLConfig, targets: tuple[str, ...] = LORA_TARGET_MODULES) -> None:
    """Freeze the denoiser and add trainable LoRA adapters on its attention projections `targets` (peft; the
    family's `lora_targets`: SD3 / FLUX add the text stream's add_q/k/v_proj and to_add_out)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                init_lora_weights="gaussian", target_modules=list(targets)))


def save_final_model(unet, parts: DiffusionParts, cfg: ReFLConfig, out_dir: Path) -> Path:
    """Diffusers format: the base pipeline with the trained denoiser (full fine-tuning), loadable with the family's
    pipeline class or AutoPipelineForText2Image, or `pytorch_lora_weights.safetensors` for `load_lora_weights`."""
    import diffusers

    pipeline_class = getattr(diffusers, parts.family.pipeline_class)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.lora_rank:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(unet)
        if parts.family.denoiser == "unet":  # UNet LoRA files use diffusers' own names; transformers keep peft's
            layers = convert_state_dict_to_diffusers(layers)
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        name = parts.family.denoiser  # unet_lora_layers / transformer_lora_layers
        kwargs = {f"{name}_lora_layers": layers}
        if f"{name}_lora_adapter_metadata" in inspect.signature(pipeline_class.save_lora_weights).parameters:
            # rank and alpha travel with the weights: without them load_lora_weights assumes alpha = rank
            kwargs[f"{name}_lora_adapter_metadata"] = unet.peft_config["default"].to_dict()
        pipeline_class.save_lora_weights(save_directory=os.fspath(out_dir), safe_serialization=True, **kwargs)
    else:
        pipe = base_pipeline(cfg)  # fp32 frozen parts from the source, not their training-dtype copies
        denoiser = getattr(pipe, parts.family.denoiser)
        denoiser.load_state_dict({k: v.detach().float().cpu() for k, v in unet.state_dict().items()})
        sample_size = denoiser.config.get("sample_size")
        if sample_size is not None and parts.latent_size != sample_size:  # trained at another size: generate there
            denoiser.register_to_config(sample_size=parts.latent_size)
        pipe.save_pretrained(os.fspath(out_dir), safe_serialization=True)
    info = {"base": cfg.pretrained, "family": parts.family.name, "lora_rank": cfg.lora_rank,
            "format": "lora" if cfg.lora_rank else "pipeline", "resolution": parts.resolution,
            "config": cfg.to_dict()}
    (out_dir / "refl_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def base_pipeline(cfg: ReFLConfig):
    """The untrained source pipeline in fp32 on the CPU (the frame the exported UNet goes into)."""
    from rayapp.diffusion import load_pipeline

    return load_pipeline(cfg.pretrained, dtype=torch.float32, seed=cfg.tiny_seed, use_t5=cfg.use_t5)
