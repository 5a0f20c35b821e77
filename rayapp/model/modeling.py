"""ImageReward: BLIP ViT image encoder -> BERT text encoder cross-attending to every image token -> MLP head.

Read top to bottom: the head, the model (construction, forward), then the scoring API built on it.
The encoders are transformers' BLIP modules; only the head and the glue live here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import RewardModelConfig
from .dtypes import resolve_dtype
from .images import preprocess_tensor
from .scoring import BatchScoringMixin, check_prompts


class RewardHead(nn.Module):
    """The reference's MLP: Linear(+Dropout) x3, Linear, Linear, no activations -> one scalar per row."""

    def __init__(self, input_size: int, hidden_sizes: Sequence[int], dropouts: Sequence[float]):
        super().__init__()
        if len(dropouts) != len(hidden_sizes) - 1:
            raise ValueError("head_dropouts needs one entry per hidden Linear except the last")
        sizes = [input_size, *hidden_sizes]
        layers: list[nn.Module] = []
        for i in range(len(hidden_sizes)):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(dropouts):
                layers.append(nn.Dropout(dropouts[i]))
        layers.append(nn.Linear(sizes[-1], 1))
        # Keeping the reference's Sequential indices (0,2,4,6,7) makes the official key mapping trivial.
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Variance-preserving init: the reference's N(0, 1/769) weights make the product of five maps ~0,
        the output constant and the loss stuck at ln 2 (upstream issue #45)."""
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
                nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


def blip_vision_config(cfg: RewardModelConfig):
    """transformers' BlipVisionConfig for the ViT that `cfg` describes (the BLIP baseline uses it too)."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_hidden_layers=cfg.vision_num_layers,
        num_attention_heads=cfg.vision_num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.vision_layer_norm_eps,
        hidden_act="gelu",  # exact erf GELU, as the reference ViT
        attention_dropout=0.0,
        initializer_range=0.02,  # the transformers default (1e-10) starts a scratch tower at ~0
    )


def blip_text_config(cfg: RewardModelConfig):
    """transformers' BlipTextConfig for the BERT that `cfg` describes, with its cross-attention layers."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_hidden_size,
        encoder_hidden_size=cfg.vision_hidden_size,  # cross-attention K/V read the ViT width (SPEC 1)
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_num_layers,
        num_attention_heads=cfg.text_num_heads,
        max_position_embeddings=cfg.text_max_positions,
        hidden_dropout_prob=cfg.text_dropout,
        attention_probs_dropout_prob=cfg.text_dropout,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # creates the cross-attention layers; we call with is_decoder=False (bidirectional)
        use_cache=False,
    )


class ImageReward(BatchScoringMixin, nn.Module):
    """Text-image reward model with the reference's scoring API, batched and dtype-aware."""

    def __init__(self, config: RewardModelConfig, tokenizer: Any = None):
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.config = config
        self.tokenizer = tokenizer
        self.vision = BlipVisionModel(blip_vision_config(config))
        self.text = BlipTextModel(blip_text_config(config), add_pooling_layer=False)
        self.head = RewardHead(config.text_hidden_size, config.head_hidden_sizes, config.head_dropouts)
        if tokenizer is not None and len(tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids but the model's vocab_size is {config.vocab_size}")

    # ---- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.head.layers[0].weight.device

    @property
    def image_size(self) -> int:
        """Side in pixels of the square images the vision encoder reads."""
        return self.config.image_size

    @property
    def dtype(self) -> torch.dtype:
        """The encoders' dtype (the head computes in its own dtype, float32 unless cast explicitly)."""
        return self.vision.embeddings.patch_embedding.weight.dtype

    def set_dtype(self, dtype: torch.dtype | str | None) -> ImageReward:
        """Cast the encoders to `dtype`; the head stays float32, as the reference casts CLS features."""
        if dtype is not None:
            dtype = resolve_dtype(dtype)
            self.vision.to(dtype=dtype)
            self.text.to(dtype=dtype)
        return self

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw head output [B] (float32 unless the head was cast); the training signal, unnormalised."""
        image_embeds = self.vision(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text_out = self.text(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        features = text_out.last_hidden_state[:, 0, :]  # [CLS]
        return self.head(features.to(self.head.layers[0].weight.dtype))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Map raw head outputs to rewards: (raw - mean) / std."""
        return (raw - self.config.reward_mean) / self.config.reward_std

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad / truncate to `max_length`; `[CLS]` stays first (ImageReward does not swap in `[ENC]`)."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; pass tokenizer= when creating or loading it")
        check_prompts(prompts, allow_empty=False)
        enc = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.config.max_length,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def reward(self, images_0_1: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """Differentiable normalised rewards [B] for images in [0,1] of any size (ReFL's objective)."""
        batch = images_0_1.shape[0]
        prompts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        pixel_values = preprocess_tensor(images_0_1, self.config.image_size)
        input_ids, attention_mask = self.tokenize(prompts)
        return self.normalize(self(pixel_values, input_ids, attention_mask))

    # ---- scoring API (inference) ----------------------------------------------------------------
    @torch.inference_mode()
    def score_batch(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised float32 rewards [B] for already preprocessed inputs (Serve, Ray Data)."""
        return self.normalize(self(pixel_values, input_ids, attention_mask).float())

    # ---- training helpers -----------------------------------------------------------------------
    def freeze_fix_rate(self, fix_rate: float) -> None:
        """SPEC 2 freezing: embeddings plus the lowest int(L * fix_rate) layers of each encoder."""
        if not 0.0 <= fix_rate <= 1.0:
            raise ValueError(f"fix_rate must be in [0, 1], got {fix_rate}")
        self.requires_grad_(True)
        if fix_rate == 0:
            return
        text_frozen = int(self.config.text_num_layers * fix_rate)
        vision_frozen = int(self.config.vision_num_layers * fix_rate)
        self.text.embeddings.requires_grad_(False)
        self.vision.embeddings.requires_grad_(False)
        for layer in self.text.encoder.layer[:text_frozen]:
            layer.requires_grad_(False)
        for layer in self.vision.encoder.layers[:vision_frozen]:
            layer.requires_grad_(False)

    # ---- persistence (implemented in checkpoint.py) ----------------------------------------------
    def save_pretrained(self, save_dir) -> None:
        """Write config.json, model.safetensors and the tokenizer files to `save_dir`."""
        from .checkpoint import save_pretrained

        save_pretrained(self, save_dir)

    def export_official(self, save_dir) -> None:
        """Write ImageReward.pt + med_config.json with the reference's key names."""
        from .checkpoint import export_official

        export_official(self, save_dir)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload weights, config, tokenizer and a model card to the hub repo `repo_id` (see `hub.push_to_hub`)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

