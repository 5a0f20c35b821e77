"""What every baseline scorer shares: the scoring API, dtype handling, save/load of its directory."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from rayapp.model.checkpoint import save_weights_dir
from rayapp.model.dtypes import resolve_dtype
from rayapp.model.scoring import BatchScoringMixin

from . import SCORER_CONFIG


class BaselineScorer(BatchScoringMixin, nn.Module):
    """Shared scoring API: subclasses provide `tokenize`, `forward_scores` and `config_dict`."""

    name = "baseline"
    uses_prompt = True

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = int(image_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def set_dtype(self, dtype: torch.dtype | str | None) -> BaselineScorer:
        """Cast every weight to `dtype` (None keeps it)."""
        if dtype is not None:
            self.to(dtype=resolve_dtype(dtype))
        return self

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_scores(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config_dict(self) -> dict:
        """What the scorer module's `load_saved` needs, besides the weights, to rebuild this scorer."""
        raise NotImplementedError

    @torch.inference_mode()
    def score_batch(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
        """float32 scores [B] for preprocessed pixels [B,3,S,S] and token ids/masks [B,L]."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        return self.forward_scores(pixel_values, input_ids.to(self.device), attention_mask.to(self.device)).float()

    def save_pretrained(self, save_dir: str | os.PathLike) -> None:
        """scorer.json + model.safetensors (+ tokenizer files): what `load_score(name, save_dir)` reads."""
        save_weights_dir(self, save_dir, SCORER_CONFIG, {"scorer": self.name, **self.config_dict()})
