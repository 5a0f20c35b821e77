"""The reference's scoring call shapes (score, inference_rank, score_pairs), batched, for any scorer."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def rank_from_scores(scores: Sequence[float]) -> list[int]:
    """ranking[i] = rank of item i by descending score, 1 = best; ties keep input order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranking = [0] * len(scores)
    for rank, index in enumerate(order, start=1):
        ranking[index] = rank
    return ranking


class BatchScoringMixin:
    """Adds score / score_pairs / inference_rank to a scorer with tokenize, preprocess and score_batch."""

    def score_pairs(self, prompts: Sequence[str], images: Sequence[Any], *, batch_size: int = 16,
                    progress: bool = False) -> list[float]:
        """One score per (prompt[i], image[i]) pair, in batches of `batch_size`."""
        prompts, images = list(prompts), list(images)
        if len(prompts) != len(images):
            raise ValueError(f"score_pairs needs equal lengths, got {len(prompts)} prompts and {len(images)} images")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt[{i}] must be a string, got {type(prompt).__name__}")
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

    def inference_rank(self, prompt: str, images: Sequence[Any], *, batch_size: int = 16) -> tuple[list[int], list[float]]:
        """(ranking, scores): ranking[i] is image i's rank, 1 = best; ties keep input order."""
        scores = self.score(prompt, list(images), batch_size=batch_size)
        return rank_from_scores(scores), scores
