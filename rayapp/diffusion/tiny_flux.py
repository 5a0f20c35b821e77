"""A tiny FLUX.1 pipeline built from configs (random weights), for offline tests and presets.

Same structure as FLUX.1-dev at toy widths: a `FluxTransformer2DModel` (double- and single-stream blocks, 3-axis
rotary positions over text ids and image ids, the guidance embedding of the guidance-distilled models) on
2x2-packed 16-channel latents, a CLIP text encoder whose pooled output feeds `pooled_projections`, a T5 encoder
for the token states, FLUX's VAE scaling and shift factors, and the flow-matching Euler scheduler with
resolution-dependent (dynamic) shifting. `FluxPipeline.from_pretrained(build_tiny_flux_pipeline(dir))` loads it
offline. FLUX pipelines pick 128 latent pixels by default; pass height / width (64 for the tiny one).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .tiny import TINY_IMAGE_SIZE, TINY_TEXT_HIDDEN, build_tiny_clip_tokenizer, seeded_build, tiny_text_config
from .tiny_sd3 import TINY_FLOW_LATENT_CHANNELS, build_tiny_t5_tokenizer, tiny_flow_vae, tiny_t5_encoder

TINY_FLUX_T5_HIDDEN = 32  # FLUX.1: 4096 (T5-XXL)
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159  # black-forest-labs/FLUX.1-dev vae/config.json
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}  # ... scheduler config


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """The tiny FLUX pipeline in memory (same seed -> same weights); `guidance_embeds` as FLUX.1-dev (True) or
    schnell (False)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()

    def build():
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * TINY_FLOW_LATENT_CHANNELS, num_layers=1, num_single_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=TINY_FLUX_T5_HIDDEN,
            pooled_projection_dim=TINY_TEXT_HIDDEN, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
        )
        vae = tiny_flow_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT)
        return transformer, vae, CLIPTextModel(tiny_text_config(tokenizer)), tiny_t5_encoder(tokenizer_2,
                                                                                              TINY_FLUX_T5_HIDDEN)

    transformer, vae, text_encoder, text_encoder_2 = seeded_build(seed, build)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux_pipeline(save_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny FLUX pipeline and `save_pretrained` it to `save_dir` (outside torch.distributed). Returns
    the directory."""
    save_dir = Path(save_dir)
    pipe = tiny_flux_pipeline(seed=seed)
    save_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(os.fspath(save_dir), safe_serialization=True)
    (save_dir / "rayapp_tiny.json").write_text(json.dumps({"seed": seed, "image_size": TINY_IMAGE_SIZE,
                                                            "family": "flux"}))
    return save_dir
