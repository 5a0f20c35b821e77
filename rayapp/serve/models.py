"""Scorers inside a model replica: loading (registry names, paths, URIs), and one batching runner per model.

Names resolve through the one scorer registry (`rayapp.scorers`); URIs are fetched through the one URI cache
(`rayapp.data.storage.local_path`), so two replicas on a node loading the same model download it once.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from rayapp.data import storage
from rayapp.serve.config import CHECKPOINT_ID, ModelSpec

logger = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    """A request named a model that is neither configured nor a loadable user checkpoint."""


class ModelLoadError(RuntimeError):
    """A user checkpoint exists but does not load (wrong format, missing files)."""


def count_images(items: list) -> int:
    """serve.batch size function: a batch is measured in images, not requests."""
    return sum(int(pixels.shape[0]) for pixels, _ in items)


# ------------------------------------------------------------------------------------------- sources
def load_spec(spec: ModelSpec, device: str | None, dtype: str | None):
    """The scorer object for a configured model, in eval mode (`rayapp.load_score` fetches URI sources)."""
    from rayapp.scorers import load_score

    return load_score(spec.scorer, spec.source, device=spec.device or device, dtype=spec.dtype or dtype,
                      **spec.options)


def resolve_checkpoint(root: str, model_id: str) -> str:
    """The path or URI of user checkpoint `model_id` under `root`; ids never climb out of it."""
    if not CHECKPOINT_ID.match(model_id) or any(part in (".", "..") for part in model_id.split("/")):
        raise ModelNotFoundError(f"{model_id!r} is not a valid checkpoint id (relative path, [A-Za-z0-9._+-] parts)")
    if storage.is_remote(root):
        return storage.join(root, model_id)
    base = Path(storage.local_path(root)).resolve()
    path = (base / model_id).resolve()
    # resolve() follows symlinks: a link inside the root that points outside it is refused as well.
    if base != path and base not in path.parents:
        raise ModelNotFoundError(f"{model_id!r} leaves the checkpoint root")
    if not path.exists():
        raise ModelNotFoundError(f"no checkpoint {model_id!r} under the checkpoint root")
    return os.fspath(path)


def load_checkpoint(root: str, model_id: str, device: str | None, dtype: str | None):
    """An ImageReward user checkpoint (save_pretrained dir, ImageReward.pt or its dir) below `root`, and its
    weights identity (`weights_identity`)."""
    import rayapp

    location = resolve_checkpoint(root, model_id)
    try:
        local = storage.local_path(location)
    except FileNotFoundError:
        raise ModelNotFoundError(f"no checkpoint {model_id!r} under the checkpoint root") from None
    try:
        model = rayapp.load(local, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise ModelLoadError(f"checkpoint {model_id!r} does not load: {err}") from None
    return model, weights_identity(_weights_in(local))


# ------------------------------------------------------------------------------------------- weights digest
def sha256_file(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes as stored."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_in(location: str) -> Path | None:
    """The weights file of a local checkpoint: the file itself, or a directory's model.safetensors / .pt."""
    from rayapp.model.checkpoint import OFFICIAL_WEIGHTS, PRETRAINED_WEIGHTS

    path = Path(location)
    if path.is_file():
        return path
    for name in (PRETRAINED_WEIGHTS, OFFICIAL_WEIGHTS):
        if (path / name).is_file():
            return path / name
    return None


def weights_file(spec: ModelSpec) -> Path | None:
    """The file a configured model's weights were read from; None for a baseline's published multi-file weights."""
    if spec.source is not None:
        local = storage.local_path(spec.source) if storage.is_uri(spec.source) else spec.source
        found = _weights_in(local)
        if found is not None or spec.scorer != "ImageReward":
            return found
    if spec.scorer == "ImageReward":
        from rayapp.model.loading import weights_file as imagereward_weights

        return imagereward_weights(spec.source or "ImageReward-v1.0", download_root=spec.options.get("download_root"))
    weights = spec.options.get("weights")
    return _weights_in(storage.local_path(weights) if storage.is_uri(weights) else weights) if weights else None


def weights_identity(path: Path | None) -> dict:
    """sha256 of the weights file (computed once, when a replica loads the model) and its mtime as `created`."""
    if path is None:
        return {"weights_sha256": None, "weights_file": None, "created": int(time.time())}
    return {"weights_sha256": sha256_file(path), "weights_file": path.name, "created": int(path.stat().st_mtime)}


# ------------------------------------------------------------------------------------------- runner
def describe(model) -> dict:
    """Kind, input size and prompt token limit of a loaded scorer (ImageReward or a baseline)."""
    config = getattr(model, "config", None)
    image_size = getattr(model, "image_size", None) or config.image_size
    max_length = getattr(model, "max_length", None) or getattr(config, "max_length", None)
    uses_prompt = bool(getattr(model, "uses_prompt", True))
    return {"scorer": getattr(model, "name", "ImageReward"),
            "image_size": int(image_size), "max_length": int(max_length) if uses_prompt and max_length else None,
            "uses_prompt": uses_prompt, "device": str(model.device),
            "dtype": str(model.dtype).replace("torch.", "")}


class ModelRunner:
    """One scorer with its own dynamic batching queue (a `serve.batch` made for this instance)."""

    def __init__(self, model_id: str, model, max_batch_size: int, batch_wait_timeout_s: float, metrics=None,
                 identity: dict | None = None):
        from ray import serve

        self.model_id = model_id
        self.model = model
        self.metrics = metrics
        self.details = describe(model)
        self.identity = identity or weights_identity(None)
        self._max_batch_size = int(max_batch_size)
        self.forward_seconds = 0.0  # totals since start: what benchmarks/serve_load.py reads to place the time
        self.images_scored = 0
        self.batches = 0
        # serve.batch keeps its queue per decorated function, so each runner decorates its own bound method.
        self._enqueue = serve.batch(max_batch_size=self._max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                                    batch_size_fn=count_images)(self._run_batch)

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def batch_wait_timeout_s(self) -> float:
        return self._enqueue._get_batch_wait_timeout_s()

    def set_batching(self, max_batch_size: int | None, batch_wait_timeout_s: float | None) -> None:
        """Apply new batching settings live."""
        if max_batch_size is not None:
            self._max_batch_size = int(max_batch_size)
            self._enqueue.set_max_batch_size(self._max_batch_size)
        if batch_wait_timeout_s is not None:
            self._enqueue.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    def info(self) -> dict:
        """What the ingress needs to preprocess and what /v1/models reports for this model."""
        return {"id": self.model_id, **self.details, **self.identity, "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "stats": {"forward_seconds": self.forward_seconds, "images": self.images_scored,
                          "batches": self.batches}}

    async def score(self, pixels: np.ndarray, prompts: list[str]) -> dict:
        """Rewards for pixels[i] (uint8 [N,S,S,3]) under prompts[i], split into batch-sized parts."""
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for {len(prompts)} prompts")
        step = self._max_batch_size  # serve.batch never sees an item above its limit
        parts = await asyncio.gather(*[
            self._enqueue((pixels[i : i + step], prompts[i : i + step])) for i in range(0, len(prompts), step)
        ])
        truncated = self._truncated(prompts)
        return {
            "scores": [s for part in parts for s in part["scores"]],
            "truncated": truncated,
            "batch_size": max(part["batch_size"] for part in parts),
            "batch_requests": max(part["batch_requests"] for part in parts),
            "weights_sha256": self.identity["weights_sha256"],
        }

    def _truncated(self, prompts: list[str]) -> list[bool]:
        limit = self.details["max_length"]
        tokenizer = getattr(self.model, "tokenizer", None)
        if not self.details["uses_prompt"] or tokenizer is None or not limit:
            return [False] * len(prompts)
        unique = list(dict.fromkeys(prompts))
        lengths = dict(zip(unique, (len(ids) for ids in tokenizer(unique, truncation=False)["input_ids"])))
        return [lengths[p] > limit for p in prompts]

    async def _run_batch(self, items: list[tuple[np.ndarray, list[str]]]) -> list[dict]:
        pixels = np.concatenate([p for p, _ in items]) if len(items) > 1 else items[0][0]
        prompts = [t for _, ps in items for t in ps]
        # Off the event loop, so the next batch fills while this one runs.
        started = time.perf_counter()
        scores = await asyncio.to_thread(self._forward, pixels, prompts)
        seconds = time.perf_counter() - started
        self.forward_seconds += seconds
        self.images_scored += len(scores)
        self.batches += 1
        if self.metrics is not None:
            self.metrics.observe_batch(self.model_id, scores, len(items), seconds)
        out, start = [], 0
        for p, _ in items:
            n = p.shape[0]
            out.append({"scores": scores[start : start + n], "batch_size": len(prompts), "batch_requests": len(items)})
            start += n
        return out

    def _forward(self, pixels: np.ndarray, prompts: list[str]) -> list[float]:
        import torch

        from rayapp.model.images import normalize_uint8

        ids, mask = self.model.tokenize(prompts)
        values = torch.from_numpy(normalize_uint8(pixels))
        device = self.model.device
        scores = self.model.score_batch(values.to(device=device, dtype=self.model.dtype), ids.to(device),
                                        mask.to(device))
        return scores.float().cpu().tolist()

    def close(self) -> None:
        """Drop the weights and stop this runner's batching task (an evicted multiplexed checkpoint)."""
        self.model = None
        try:
            # serve.batch exposes no close(); its queue's task would otherwise idle forever.
            queue = self._enqueue._is_batching_task_alive.__self__._queue
        except AttributeError:
            return
        task = getattr(queue, "_handle_batch_task", None) if queue is not None else None
        if task is None or task.done():
            return
        try:
            on_loop = asyncio.get_running_loop() is task.get_loop()
        except RuntimeError:
            on_loop = False
        if on_loop:
            task.cancel()
        else:  # Serve calls __del__ of an evicted model from an executor thread
            task.get_loop().call_soon_threadsafe(task.cancel)

    def __del__(self) -> None:
        # Serve's multiplexing calls __del__ when it evicts a model: free the weights at once.
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from a finaliser (the loop may be closed)
            self.model = None
