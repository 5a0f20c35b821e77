"""The models ReFL works with: the Stable Diffusion parts (UNet trained, the rest frozen), the frozen reward
model, LoRA adapters, and the exported result."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ReFLConfig

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


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
    from rayapp.diffusion import load_pipeline, make_scheduler, tiny_sd_pipeline, vae_scale_factor

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

    if cfg.reward is None:
        model = random_tiny_reward_model(cfg.reward_seed, cfg.reward_tokenizer).to(device)
    else:
        model = rayapp.load(cfg.reward, device=device, tokenizer=cfg.reward_tokenizer)
    model.set_dtype(dtype if dtype != torch.float32 else None)
    model.eval().requires_grad_(False)
    return model


def random_tiny_reward_model(seed: int, tokenizer=None):
    """The offline default RM: the tiny preset with random-but-fixed weights over the synthetic captions' words.

    Its preferences mean nothing; ReFL can still climb it, which is what the offline runs and tests show.
    """
    import rayapp
    from rayapp.data.synth import vocabulary
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    state = torch.random.get_rng_state()  # building must not move the caller's random stream
    try:
        return rayapp.create_model("tiny", tokenizer=tokenizer or build_wordpiece_tokenizer(vocabulary()),
                                   seed=seed)
    finally:
        torch.random.set_rng_state(state)


def encode_prompts(parts: DiffusionParts, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP text-encoder hidden states of `prompts` (no gradient: the text encoder is frozen)."""
    tok = parts.tokenizer(list(prompts), padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    with torch.no_grad():
        return parts.text_encoder(tok.input_ids.to(device))[0]


def add_lora(unet, cfg: ReFLConfig) -> None:
    """Freeze the UNet and add trainable LoRA adapters on its attention projections (peft)."""
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


