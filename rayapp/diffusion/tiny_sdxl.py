"""A tiny Stable Diffusion XL pipeline built from configs (random weights), for offline tests and presets.

Same structure as SDXL base at toy widths: two CLIP text encoders (the second a `CLIPTextModelWithProjection`
whose projected pooled embedding feeds the UNet's `text_embeds`), their penultimate hidden states
concatenated as the cross-attention context, the "text_time" added conditioning (size / crop `time_ids`),
a VAE that asks for fp32 decoding in half precision (`force_upcast`), and SDXL's Euler scheduler with its
scaled-linear betas. `StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl_pipeline(dir))` loads it
offline and renders 64x64 images.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .schedulers import sdxl_scheduler_config
from .tiny import (
    TINY_IMAGE_SIZE,
    TINY_TEXT_HIDDEN,
    build_tiny_clip_tokenizer,
    seeded_build,
    tiny_text_config,
    tiny_unet_config,
    tiny_vae,
)

TINY_SDXL_TIME_EMBED_DIM = 8  # SDXL base: 256 per size/crop number
TINY_SDXL_PROJECTION_DIM = 32  # SDXL base: 1280 (text_encoder_2's projection)
TINY_SDXL_VAE_SCALING = 0.13025  # SDXL's VAE scaling factor, kept so the latent scale differs from SD 1.x


def tiny_sdxl_pipeline(seed: int = 0):
    """The tiny SDXL pipeline in memory (same seed -> same weights, in any process)."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_clip_tokenizer()
    tokenizer_2 = build_tiny_clip_tokenizer()

    def build():
        unet = UNet2DConditionModel(**tiny_unet_config(
            cross_attention_dim=2 * TINY_TEXT_HIDDEN,  # both encoders' hidden states, concatenated
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TINY_SDXL_PROJECTION_DIM + 6 * TINY_SDXL_TIME_EMBED_DIM,
            transformer_layers_per_block=1,
        ))
        vae = tiny_vae()
        vae.register_to_config(scaling_factor=TINY_SDXL_VAE_SCALING, force_upcast=True)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2,
                                                                      projection_dim=TINY_SDXL_PROJECTION_DIM))
        return unet, vae, text_encoder, text_encoder_2

    unet, vae, text_encoder, text_encoder_2 = seeded_build(seed, build)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(sdxl_scheduler_config()),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(save_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny SDXL pipeline and `save_pretrained` it to `save_dir` (call outside torch.distributed:
    transformers writes weights only on rank 0 inside one). Returns the directory."""
    save_dir = Path(save_dir)
    pipe = tiny_sdxl_pipeline(seed=seed)
    save_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(os.fspath(save_dir), safe_serialization=True)
    (save_dir / "rayapp_tiny.json").write_text(json.dumps({"seed": seed, "image_size": TINY_IMAGE_SIZE,
                                                            "family": "sdxl"}))
    return save_dir
