"""A tiny Stable Diffusion pipeline built from configs (random weights), for offline tests and presets.

`build_tiny_sd_pipeline(dir)` writes a complete `StableDiffusionPipeline` (UNet, VAE, CLIP text encoder,
a small CLIP byte-level BPE vocabulary, DDIM scheduler) with `save_pretrained`; it loads offline with
`StableDiffusionPipeline.from_pretrained(dir)` and renders 64x64 images in a few milliseconds per step on
a CPU. Its architecture mirrors SD 1.x (4 latent channels, cross-attention UNet, VAE scaling 0.18215)
at toy widths, so every code path of ReFL and generation runs unchanged against it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rayapp.data.synth import vocabulary

from .schedulers import make_scheduler

# Words that get whole-word BPE tokens (everything else still splits into byte tokens): the synthetic
# captions' vocabulary plus words common in example prompts.
EXAMPLE_PROMPT_WORDS = (
    "an", "the", "of", "in", "with", "and", "at", "to", "photo", "picture", "image", "painting", "portrait",
    "drawing", "cat", "dog", "bird", "sunset", "over", "mountains", "city", "night", "day", "sky", "sea", "tree",
    "house", "car",
)
TINY_WORDS = tuple(vocabulary()) + tuple(EXAMPLE_PROMPT_WORDS)

TINY_IMAGE_SIZE = 64  # output resolution in pixels (square)
TINY_VAE_CHANNELS = (16, 32, 32)  # three VAE levels -> latent downsampling factor 4 -> 16x16x4 latents
TINY_UNET_CHANNELS = (32, 64)
TINY_TEXT_HIDDEN = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_clip_bpe_vocab(words=TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary: 256 byte symbols, their end-of-word forms, merges that
    spell each word in `words` left to right, and the two special tokens. Returns (vocab, merges)."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in symbols:
        vocab.setdefault(sym, len(vocab))
    for sym in symbols:
        vocab.setdefault(sym + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted({w.lower() for w in words}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        if len(pieces) < 2:
            continue
        left = pieces[0]
        for right in pieces[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.setdefault(left + right, len(vocab))
            left = left + right
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def build_tiny_clip_tokenizer(save_dir: str | os.PathLike | None = None, words=TINY_WORDS):
    """A `CLIPTokenizer` over the tiny BPE vocabulary (max length 77, as SD's); saved if `save_dir`."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_bpe_vocab(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer


def build_tiny_sd_pipeline(save_dir: str | os.PathLike, seed: int = 0, scheduler: str = "ddim") -> Path:
    """Build a tiny random-weight StableDiffusionPipeline from configs and `save_pretrained` it to `save_dir`.

    seed: torch seed for the random weights (same seed -> identical pipeline).
    scheduler: "ddim" or "ddpm" (both with SD's scaled-linear betas 0.00085..0.012 over 1000 steps).
    Returns the directory, loadable with `StableDiffusionPipeline.from_pretrained(save_dir)` offline.
    Call it outside a torch.distributed job (transformers writes weights only on rank 0 there); inside
    one, use `tiny_sd_pipeline` (in memory).
    """
    save_dir = Path(save_dir)
    pipe = tiny_sd_pipeline(seed=seed, scheduler=scheduler)
    save_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(os.fspath(save_dir), safe_serialization=True)
    (save_dir / "rayapp_tiny.json").write_text(json.dumps({"seed": seed, "image_size": TINY_IMAGE_SIZE}))
    return save_dir


def tiny_vae():
    """The tiny AutoencoderKL (three levels: latent factor 4, 4 latent channels), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(TINY_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(TINY_VAE_CHANNELS),
        block_out_channels=TINY_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )


def tiny_text_config(tokenizer, **overrides):
    """A two-layer CLIP text config over the tiny tokenizer's vocabulary (77 positions, as SD's)."""
    from transformers import CLIPTextConfig

    values = {"vocab_size": len(tokenizer), "hidden_size": TINY_TEXT_HIDDEN, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    values.update(overrides)
    return CLIPTextConfig(**values)


def seeded_build(seed: int, build):
    """`build()` under torch seed `seed`, leaving the caller's random stream where it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_unet_config(**family: object) -> dict:
    """UNet2DConditionModel arguments of the tiny pipelines: the shared toy geometry plus the family's own
    conditioning arguments (cross-attention width, heads, SDXL's added time/text embeddings)."""
    latent_factor = 2 ** (len(TINY_VAE_CHANNELS) - 1)
    return {
        "sample_size": TINY_IMAGE_SIZE // latent_factor,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": TINY_UNET_CHANNELS,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        **family,
    }


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """The tiny pipeline of `build_tiny_sd_pipeline`, in memory (same seed -> same weights, any process)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tiny_clip_tokenizer()

    def build():
        unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=TINY_TEXT_HIDDEN, attention_head_dim=8))
        return unet, tiny_vae(), CLIPTextModel(tiny_text_config(tokenizer))

    unet, vae, text_encoder = seeded_build(seed, build)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
