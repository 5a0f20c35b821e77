"""Aesthetic score: the LAION "improved aesthetic predictor" MLP on the L2-normalised CLIP ViT-L/14 image
embedding; the prompt is ignored.

Real weights: `https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/`
`sac%2Blogos%2Bava1-l14-linearMSE.pth` (state_dict `layers.{0,2,4,6,7}.{weight,bias}`, 768 -> 1), on top
of `openai/clip-vit-large-patch14`'s vision tower and projection. A third-party hub mirror is usable with
`weights="hf://camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"` (not verified
against the original here).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from rayapp.model.checkpoint import load_state_strict, read_state_dict
from rayapp.model.modeling import RewardHead  # the same five-Linear, no-activation MLP

from .base import BaselineScorer
from .download import CLIP_HUB_REPO, RealWeights, fetch_weights

AESTHETIC_WEIGHTS_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)
AESTHETIC_HIDDEN = [1024, 128, 64, 16]
AESTHETIC_DROPOUTS = [0.2, 0.2, 0.1]


class AestheticScorer(BaselineScorer):
    """LAION improved-aesthetic-predictor: MLP(normalize(CLIP image embedding)); the prompt is unused."""

    name = "Aesthetic"
    uses_prompt = False

    def __init__(self, vision_config, projection_dim: int, hidden_sizes=AESTHETIC_HIDDEN, dropouts=AESTHETIC_DROPOUTS,
                 clip_vision=None):
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if clip_vision is None:
            config = CLIPVisionConfig(**{**vision_config.to_dict(), "projection_dim": projection_dim})
            clip_vision = CLIPVisionModelWithProjection(config)
        super().__init__(clip_vision.config.image_size)
        self.clip_vision = clip_vision
        self.mlp = RewardHead(projection_dim, list(hidden_sizes), list(dropouts))
        self.hidden_sizes, self.dropouts = list(hidden_sizes), list(dropouts)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One dummy token per prompt: the score does not read the text."""
        zeros = torch.zeros(len(prompts), 1, dtype=torch.long)
        return zeros, zeros

    def forward_scores(self, pixel_values, input_ids, attention_mask):
        embeds = self.clip_vision(pixel_values=pixel_values).image_embeds
        features = F.normalize(embeds.float(), dim=-1)
        return self.mlp(features.to(self.mlp.layers[0].weight.dtype))

    def config_dict(self) -> dict:
        return {"vision_config": self.clip_vision.config.to_dict(),
                "projection_dim": self.clip_vision.config.projection_dim, "hidden_sizes": self.hidden_sizes,
                "dropouts": self.dropouts}


def build_tiny(tokenizer=None) -> AestheticScorer:
    """Random toy-size vision tower (the tiny CLIP's) and MLP; `tokenizer` is unused (no text)."""
    from .clip import clip_tokenizer, tiny_clip_config

    vision = tiny_clip_config(clip_tokenizer()).vision_config
    return AestheticScorer(vision, projection_dim=32, hidden_sizes=[32, 16, 8, 4], dropouts=[0.0, 0.0, 0.0])


def load_saved(meta: dict, directory: Path) -> AestheticScorer:
    """The architecture a `save_pretrained` directory describes (weights are loaded by the caller)."""
    from transformers import CLIPVisionConfig

    return AestheticScorer(CLIPVisionConfig.from_dict(meta["vision_config"]), meta["projection_dim"],
                           meta["hidden_sizes"], meta["dropouts"])


def load_real(source: RealWeights) -> AestheticScorer:
    """CLIP's vision tower from `source.clip_model`, the predictor MLP from `source.weights` or the LAION URL."""
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(source.clip_model or CLIP_HUB_REPO,
                                                           cache_dir=source.cache_dir)
    path = fetch_weights(source.weights or AESTHETIC_WEIGHTS_URL, source.download_root)
    state = read_state_dict(path)
    # the MLP's widths come from the file (768 -> 1024 -> 128 -> 64 -> 16 -> 1 for the LAION predictor)
    linears = sorted(int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight"))
    if not linears:
        raise ValueError(f"{path}: no layers.N.weight entries; not an aesthetic-predictor state_dict")
    widths = [int(state[f"layers.{i}.weight"].shape[0]) for i in linears]
    dropouts = AESTHETIC_DROPOUTS if len(widths) == len(AESTHETIC_HIDDEN) + 1 else [0.0] * (len(widths) - 2)
    scorer = AestheticScorer(vision.config, vision.config.projection_dim, widths[:-1], dropouts, clip_vision=vision)
    load_state_strict(scorer.mlp, state, os.fspath(path))
    return scorer
