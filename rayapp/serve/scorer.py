"""The model deployment: one ImageReward per replica, dynamically batched across concurrent requests."""
from __future__ import annotations

import asyncio
import os

import numpy as np
from ray import serve
from ray.serve.metrics import Histogram

BATCHING_KEYS = {"max_batch_size", "batch_wait_timeout_s"}
DEFAULT_BATCHING = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01}


def count_images(items: list) -> int:
    """serve.batch size function: a batch is measured in images, not requests."""
    return sum(int(pixels.shape[0]) for pixels, _ in items)


@serve.deployment(
    name="RewardScorer",
    # Enough queued requests per replica to fill a batch while the previous one runs.
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    user_config=DEFAULT_BATCHING,
)
class RewardScorer:
    """Scores preprocessed images; the model is loaded once when the replica starts."""

    def __init__(self, model: str = "ImageReward-v1.0", device: str | None = None, dtype: str | None = None,
                 num_threads: int | None = None, name: str | None = None):
        import torch

        import rayapp

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = rayapp.load(model, device=device, dtype=dtype)
        self.name = name or model
        self.max_batch_size = DEFAULT_BATCHING["max_batch_size"]
        self.batch_wait_timeout_s = DEFAULT_BATCHING["batch_wait_timeout_s"]
        self._batch_images = Histogram(
            "rayapp_batch_images",
            description="Images per model forward pass (dynamic batching).",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
        )
        self._batch_requests = Histogram(
            "rayapp_batch_requests",
            description="Requests merged into one model forward pass.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
        )

    def reconfigure(self, config: dict) -> None:
        """Apply `user_config` (batching) without reloading the model."""
        unknown = set(config) - BATCHING_KEYS
        if unknown:
            raise ValueError(f"unknown RewardScorer user_config keys {sorted(unknown)}; allowed: {sorted(BATCHING_KEYS)}")
        self.max_batch_size = int(config.get("max_batch_size", self.max_batch_size))
        self.batch_wait_timeout_s = float(config.get("batch_wait_timeout_s", self.batch_wait_timeout_s))
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        self._score_batch.set_max_batch_size(self.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def info(self) -> dict:
        """What the ingress needs to preprocess, and what /v1/models reports."""
        cfg = self.model.config
        return {
            "id": self.name,
            "image_size": cfg.image_size,
            "max_length": cfg.max_length,
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "pid": os.getpid(),
        }

    def _truncated(self, prompt: str) -> bool:
        return len(self.model.tokenizer(prompt, truncation=False)["input_ids"]) > self.model.config.max_length

    async def score(self, pixels: np.ndarray, prompts: list[str]) -> dict:
        """Normalised rewards for pixels[i] under prompts[i]; with the batch sizes it was scored in."""
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for {len(prompts)} prompts")
        # A request larger than one batch is split, so serve.batch never sees an item above the limit.
        step = self.max_batch_size
        parts = await asyncio.gather(*[
            self._score_batch((pixels[i : i + step], prompts[i : i + step])) for i in range(0, len(prompts), step)
        ])
        truncated = {p: self._truncated(p) for p in set(prompts)}
        return {
            "scores": [s for part in parts for s in part["scores"]],
            "truncated": [truncated[p] for p in prompts],
            "batch_size": max(part["batch_size"] for part in parts),
            "batch_requests": max(part["batch_requests"] for part in parts),
        }

    @serve.batch(batch_size_fn=count_images, **DEFAULT_BATCHING)
    async def _score_batch(self, items: list[tuple[np.ndarray, list[str]]]) -> list[dict]:
        pixels = np.concatenate([p for p, _ in items])
        prompts = [t for _, ps in items for t in ps]
        # Off the event loop, so the next batch fills while this one runs.
        scores = await asyncio.to_thread(self._forward, pixels, prompts)
        self._batch_images.observe(len(prompts))
        self._batch_requests.observe(len(items))
        out, start = [], 0
        for p, _ in items:
            n = p.shape[0]
            out.append({"scores": scores[start : start + n], "batch_size": len(prompts), "batch_requests": len(items)})
            start += n
        return out

    def _forward(self, pixels: np.ndarray, prompts: list[str]) -> list[float]:
        import torch

        ids, mask = self.model.tokenize(prompts)
        device = self.model.device
        values = torch.from_numpy(pixels).to(device=device, dtype=self.model.dtype)
        scores = self.model.score_batch(values, ids.to(device), mask.to(device))
        return scores.float().cpu().tolist()
