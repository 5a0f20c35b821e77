"""CLIP score: cos(image embedding, text embedding) of CLIP ViT-L/14 (transformers `CLIPModel`).

Real weights: the reference uses openai/CLIP's `ViT-L-14.pt`; the same weights in transformers format
are the hub repo `openai/clip-vit-large-patch14` (model + tokenizer), which is what `load_real` loads.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import BaselineScorer
from .download import CLIP_HUB_REPO, RealWeights


class CLIPScorer(BaselineScorer):
    """cos(image embedding, text embedding) of a CLIP model (ViT-L/14 for the real one)."""

    name = "CLIP"

    def __init__(self, clip_config, tokenizer, model=None):
        from transformers import CLIPModel

        model = model if model is not None else CLIPModel(clip_config)
        super().__init__(model.config.vision_config.image_size)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """clip.tokenize(truncate=True) equivalent: <|startoftext|> ... <|endoftext|>, padded to max_length."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings, float32."""
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected text embeddings, float32."""
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def forward_scores(self, pixel_values, input_ids, attention_mask):
        return (self.image_embeds(pixel_values) * self.text_embeds(input_ids, attention_mask)).sum(-1)

    def config_dict(self) -> dict:
        return {"clip_config": self.model.config.to_dict()}


def tiny_clip_config(tokenizer, projection_dim: int = 32):
    """A CLIP of toy widths (64-px images, 8-px patches, 2 layers a side) over `tokenizer`'s vocabulary."""
    from transformers import CLIPConfig

    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 64, "patch_size": 8}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def clip_tokenizer(tokenizer=None):
    """A CLIPTokenizer from an object, a dir or hub name; None builds the tiny offline one."""
    from transformers import CLIPTokenizer

    if tokenizer is None:
        from rayapp.diffusion.tiny import build_tiny_clip_tokenizer

        return build_tiny_clip_tokenizer()
    if isinstance(tokenizer, (str, os.PathLike)):
        return CLIPTokenizer.from_pretrained(os.fspath(tokenizer))
    return tokenizer


def build_tiny(tokenizer=None) -> CLIPScorer:
    """Random toy-size CLIP over `tokenizer` (default: the tiny CLIP BPE vocabulary)."""
    tok = clip_tokenizer(tokenizer)
    return CLIPScorer(tiny_clip_config(tok), tok)


def load_saved(meta: dict, directory: Path) -> CLIPScorer:
    """The architecture a `save_pretrained` directory describes (weights are loaded by the caller)."""
    from transformers import CLIPConfig

    return CLIPScorer(CLIPConfig.from_dict(meta["clip_config"]), clip_tokenizer(directory))


def load_real(source: RealWeights) -> CLIPScorer:
    """`source.clip_model` (hub name or local dir) with its tokenizer, unless `source.tokenizer` names another."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(source.clip_model or CLIP_HUB_REPO, cache_dir=source.cache_dir)
    tokenizer = clip_tokenizer(source.tokenizer if source.tokenizer is not None else source.clip_model or CLIP_HUB_REPO)
    return CLIPScorer(model.config, tokenizer, model=model)
