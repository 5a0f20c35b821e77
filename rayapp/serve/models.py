"""Scorers inside a model replica: loading (names, paths, URIs), and one batching runner per model."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from rayapp.serve.config import CHECKPOINT_ID, ModelSpec

logger = logging.getLogger(__name__)

URI_CACHE_ENV = "RAYAPP_CHECKPOINT_CACHE"  # where URI checkpoints are copied; default ~/.cache/rayapp/checkpoints
_LOCAL_SCHEMES = ("file://",)


class ModelNotFoundError(LookupError):
    """A request named a model that is neither configured nor a loadable user checkpoint."""


class ModelLoadError(RuntimeError):
    """A user checkpoint exists but does not load (wrong format, missing files)."""


def count_images(items: list) -> int:
    """serve.batch size function: a batch is measured in images, not requests."""
    return sum(int(pixels.shape[0]) for pixels, _ in items)


# ------------------------------------------------------------------------------------------- sources
def is_uri(source: str) -> bool:
    """scheme://... (hf://, s3://, gs://, file://, ...), as opposed to a hub name or a local path."""
    return "://" in source and not source.startswith(("http://", "https://"))


def _cache_root() -> Path:
    return Path(os.environ.get(URI_CACHE_ENV, "~/.cache/rayapp/checkpoints")).expanduser()


def fetch_uri(uri: str) -> Path:
    """A local copy of the file or directory at `uri`, made once per node (URI-keyed cache)."""
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        owner, repo, *rest = uri[len("hf://"):].split("/", 2)
        subdir = rest[0].strip("/") if rest else ""
        local = Path(snapshot_download(repo_id=f"{owner}/{repo}",
                                       allow_patterns=[f"{subdir}/*"] if subdir else None))
        return local / subdir if subdir else local
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    if uri.startswith(_LOCAL_SCHEMES):
        return Path(path)  # already on this node: nothing to copy
    target = _cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if (target / ".complete").is_file():
        return target / Path(path).name
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ModelNotFoundError(f"{uri} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        pafs.copy_files(path, os.fspath(staging / Path(path).name), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        (staging / ".complete").write_text(uri)
        try:
            os.replace(staging, target)  # atomic: a concurrent fetch of the same URI keeps its own copy
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / Path(path).name


def load_spec(spec: ModelSpec, device: str | None, dtype: str | None):
    """The scorer object for a configured model (ImageReward or a baseline), in eval mode."""
    device = spec.device or device
    dtype = spec.dtype or dtype
    source = spec.source
    if source is not None and is_uri(source):
        source = os.fspath(fetch_uri(source))
    if spec.scorer == "ImageReward":
        import rayapp

        return rayapp.load(source, device=device, dtype=dtype)
    import rayapp

    options = dict(spec.options)
    return rayapp.load_score(spec.scorer, source, device=device, dtype=dtype, **options)


def resolve_checkpoint(root: str, model_id: str) -> str:
    """The path or URI of user checkpoint `model_id` under `root`; ids never climb out of it."""
    if not CHECKPOINT_ID.match(model_id) or any(part in (".", "..") for part in model_id.split("/")):
        raise ModelNotFoundError(f"{model_id!r} is not a valid checkpoint id (relative path, [A-Za-z0-9._+-] parts)")
    if is_uri(root) and not root.startswith(_LOCAL_SCHEMES):
        return root.rstrip("/") + "/" + model_id
    base = Path(root.removeprefix("file://")).expanduser().resolve()
    path = (base / model_id).resolve()
    # resolve() follows symlinks: a link inside the root that points outside it is refused as well.
    if base != path and base not in path.parents:
        raise ModelNotFoundError(f"{model_id!r} leaves the checkpoint root")
    if not path.exists():
        raise ModelNotFoundError(f"no checkpoint {model_id!r} under the checkpoint root")
    return os.fspath(path)


def load_checkpoint(root: str, model_id: str, device: str | None, dtype: str | None):
    """An ImageReward user checkpoint (save_pretrained dir, ImageReward.pt or its dir) below `root`."""
    import rayapp

    location = resolve_checkpoint(root, model_id)
    local = os.fspath(fetch_uri(location)) if is_uri(location) else location
    try:
        return rayapp.load(local, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise ModelLoadError(f"checkpoint {model_id!r} does not load: {err}") from None


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

    def __init__(self, model_id: str, model, max_batch_size: int, batch_wait_timeout_s: float, metrics=None):
        from ray import serve

        self.model_id = model_id
        self.model = model
        self.metrics = metrics
        self.details = describe(model)
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
        return {"id": self.model_id, **self.details, "max_batch_size": self.max_batch_size,
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
