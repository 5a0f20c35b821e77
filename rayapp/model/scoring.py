"""The reference's scoring call shapes (score, inference_rank, score_pairs), batched, for any scorer."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .images import DEFAULT_MAX_PIXELS, load_image, preprocess_pil


def rank_from_scores(scores: Sequence[float]) -> list[int]:
    """ranking[i] = rank of item i by descending score, 1 = best; ties keep input order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranking = [0] * len(scores)
    for rank, index in enumerate(order, start=1):
        ranking[index] = rank
    return ranking


def check_prompts(prompts: Sequence[Any], *, allow_empty: bool = True) -> None:
    """Every prompt must be a string (and, unless `allow_empty`, not blank); errors name the index."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt[{i}] must be a string, got {type(prompt).__name__}")
        if not allow_empty and not prompt.strip():
            raise ValueError(f"prompt[{i}] is empty")


def default_device() -> str:
    """CUDA when available, else CPU: where loaders put a model when no device is given."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class BatchScoringMixin:
    """Adds preprocess / score / score_pairs / inference_rank to an nn.Module scorer.

    The scorer provides `image_size`, `tokenize(prompts)`, `score_batch(pixels, ids, mask)` and `set_dtype`.
    """

    def preprocess(self, images: Sequence[Any], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   start: int = 0) -> torch.Tensor:
        """Decode image inputs and apply the reference's CLIP transform -> [N,3,S,S]; errors name the item's index."""
        return torch.stack([
            preprocess_pil(load_image(item, start + i, max_pixels=max_pixels), self.image_size)
            for i, item in enumerate(images)
        ])

    def ready_for_inference(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None):
        """Move to `device` (default: `default_device()`), cast with `set_dtype`, switch to eval mode; returns self."""
        self.to(device if device is not None else default_device())
        self.set_dtype(dtype)
        return self.eval()

    def score_pairs(self, prompts: Sequence[str], images: Sequence[Any], *, batch_size: int = 16,
                    progress: bool = False) -> list[float]:
        """One score per (prompt[i], image[i]) pair, in batches of `batch_size`."""
        prompts, images = list(prompts), list(images)
        if len(prompts) != len(images):
            raise ValueError(f"score_pairs needs equal lengths, got {len(prompts)} prompts and {len(images)} images")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        check_prompts(prompts)
        input_ids, attention_mask = self.tokenize(prompts)  # validates every prompt before any image work
        scores: list[float] = []
        starts = range(0, len(images), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"{getattr(self, 'name', 'ImageReward')} scoring", unit="batch")
        for start in starts:
            stop = start + batch_size
            pixel_values = self.preprocess(images[start:stop], start=start)
            scores.extend(self.score_batch(pixel_values, input_ids[start:stop], attention_mask[start:stop]).tolist())
        return scores

    def score(self, prompt: str, image: Any, *, batch_size: int = 16, progress: bool = False) -> float | list[float]:
        """Score of one image (float) or of each image in a list (list of floats, even for one item)."""
        if isinstance(image, (list, tuple)):
            return self.score_pairs([prompt] * len(image), image, batch_size=batch_size, progress=progress)
        return self.score_pairs([prompt], [image])[0]

    def inference_rank(self, prompt: str, images: Sequence[Any], *,
                       batch_size: int = 16) -> tuple[list[int], list[float]]:
        """(ranking, scores): ranking[i] is image i's rank, 1 = best; ties keep input order."""
        scores = self.score(prompt, list(images), batch_size=batch_size)
        return rank_from_scores(scores), scores
