"""A tiny Stable Diffusion 3 pipeline built from configs (random weights), for offline tests and presets; and the
tiny T5 encoder + tokenizer that the tiny SD3 and FLUX pipelines share.

Same structure as SD3 / SD3.5 at toy widths: an `SD3Transformer2DModel` (joint attention over text and 2x2
image patches), two `CLIPTextModelWithProjection` encoders (penultimate hidden states concatenated and
zero-padded to the T5 width; their projected pooled embeddings concatenated as `pooled_projections`), a T5
encoder whose states follow the CLIP tokens, a 16-channel VAE with SD3's scaling and shift factors, and the
flow-matching Euler scheduler with SD3's timestep shift 3. `StableDiffusion3Pipeline.from_pretrained(
build_tiny_sd3_pipeline(dir))` loads it offline (the T5 tokenizer is a `tokenizers` unigram model written as
tokenizer.json: no sentencepiece, no hub).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .tiny import (
    TINY_IMAGE_SIZE,
    TINY_VAE_CHANNELS,
    TINY_WORDS,
    build_tiny_clip_tokenizer,
    seeded_build,
    tiny_text_config,
)

TINY_FLOW_LATENT_CHANNELS = 16  # SD3 and FLUX VAEs: 16 latent channels
TINY_T5_HIDDEN = 64  # SD3: 4096 (T5-XXL); the joint attention width of the tiny SD3 transformer
TINY_SD3_CLIP_HIDDEN = 32  # each CLIP encoder; concatenated: 64 = the T5 width, as 768 + 1280 <= 4096 in SD3
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609  # stabilityai/stable-diffusion-3-medium-diffusers vae/config.json
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # ... scheduler/scheduler_config.json


def tiny_t5_vocab(words=TINY_WORDS) -> list[tuple[str, float]]:
    """A T5-style unigram vocabulary: <pad>=0, </s>=1, <unk>=2, the space piece, every word as one piece, and
    single letters (so unknown words still split into pieces)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for word in sorted({w.lower() for w in words}):
        for piece in (f"\u2581{word}",):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -1.0))
    for char in "abcdefghijklmnopqrstuvwxyz0123456789":
        for piece in (char, f"\u2581{char}"):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -5.0))
    return pieces


def build_tiny_t5_tokenizer(save_dir: str | os.PathLike | None = None, max_length: int = 512):
    """A `T5TokenizerFast` over the tiny unigram vocabulary (no sentencepiece model needed); saved if `save_dir`."""
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=tiny_t5_vocab(), extra_ids=0, model_max_length=max_length)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer


def tiny_t5_encoder(tokenizer, hidden: int):
    """A two-layer T5 encoder of width `hidden` over the tiny tokenizer's vocabulary, random weights."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2,
                      num_heads=hidden // 8, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config)


def tiny_flow_vae(scaling_factor: float, shift_factor: float):
    """The tiny AutoencoderKL with 16 latent channels and a family's scaling / shift factors (latent factor 4)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(TINY_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(TINY_VAE_CHANNELS), block_out_channels=TINY_VAE_CHANNELS,
        layers_per_block=1, latent_channels=TINY_FLOW_LATENT_CHANNELS, norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=False,
    )


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True):
    """The tiny SD3 pipeline in memory (same seed -> same weights, in any process); `with_t5=False` leaves out
    text_encoder_3 / tokenizer_3 (diffusers then uses zeros for the T5 states)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer()
    tokenizer_3 = build_tiny_t5_tokenizer()
    latent_factor = 2 ** (len(TINY_VAE_CHANNELS) - 1)

    def build():
        transformer = SD3Transformer2DModel(
            sample_size=TINY_IMAGE_SIZE // latent_factor, patch_size=2, in_channels=TINY_FLOW_LATENT_CHANNELS,
            out_channels=TINY_FLOW_LATENT_CHANNELS, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=TINY_T5_HIDDEN, caption_projection_dim=32,
            pooled_projection_dim=2 * TINY_SD3_CLIP_HIDDEN, pos_embed_max_size=32,
        )
        vae = tiny_flow_vae(SD3_VAE_SCALING, SD3_VAE_SHIFT)
        clip = [CLIPTextModelWithProjection(tiny_text_config(tok, hidden_size=TINY_SD3_CLIP_HIDDEN,
                                                             projection_dim=TINY_SD3_CLIP_HIDDEN))
                for tok in (tokenizer, tokenizer_2)]
        return transformer, vae, clip, tiny_t5_encoder(tokenizer_3, TINY_T5_HIDDEN)

    transformer, vae, (text_encoder, text_encoder_2), text_encoder_3 = seeded_build(seed, build)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3 if with_t5 else None, tokenizer_3=tokenizer_3 if with_t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3_pipeline(save_dir: str | os.PathLike, seed: int = 0, with_t5: bool = True) -> Path:
    """Build the tiny SD3 pipeline and `save_pretrained` it to `save_dir` (outside torch.distributed). Returns
    the directory."""
    save_dir = Path(save_dir)
    pipe = tiny_sd3_pipeline(seed=seed, with_t5=with_t5)
    save_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(os.fspath(save_dir), safe_serialization=True)
    (save_dir / "rayapp_tiny.json").write_text(json.dumps({"seed": seed, "image_size": TINY_IMAGE_SIZE,
                                                            "family": "sd3"}))
    return save_dir
