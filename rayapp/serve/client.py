"""HTTP clients for the reward endpoint; neither needs Ray or torch.

- `RewardClient(url)`: synchronous, stdlib only (urllib), one connection per call: scripts and notebooks.
- `AsyncRewardClient(url)`: asyncio on httpx, pooled keep-alive connections, timeouts, bounded retries on
  503 and dropped connections, large batches split and sent concurrently: RL trainers.
- `make_reward_fn(url)`: `reward_fn(images, prompts) -> list[float]` for synchronous training loops, running an
  AsyncRewardClient on its own event-loop thread.
- `make_ddpo_reward_fn(url)`: `reward_fn(images, prompts, metadata) -> (scores, info)`, the reward-function shape
  of ddpo-pytorch and flow_grpo (scores a float32 numpy array; info names the model and its weights digest).
- `await AsyncRewardClient(url).compute_score(images, prompts, metadata)` (or the one-shot `compute_score(url,
  ...)`): the same `(scores, info)` for trainers that await their rewards.

Every client retries 503s a bounded number of times, waiting at least the server's `Retry-After` seconds, then
raises `RewardServiceError` saying how often it tried.

Images may be paths, encoded bytes, PIL images, numpy arrays or tensors (HWC uint8, or float in [0, 1],
CHW accepted; a 4-D batch is split along its first axis). Arrays are sent as PNG, so the server scores
exactly the pixels the library would.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, Self

from rayapp.serve import wire

logger = logging.getLogger(__name__)

RETRY_STATUSES = (429, 503)  # overloaded or no replica right now (Serve's backpressure_config may say 429)


def request_chunks(sizes: list[int], max_items: int, max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive items within max_items and, past each run's first item, max_bytes."""
    chunks, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_items or total + size > max_bytes):
            chunks.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        chunks.append((start, len(sizes)))
    return chunks


class RewardServiceError(RuntimeError):
    """The endpoint answered with an error; `status` is the HTTP code, `detail` its message, `field` the culprit."""

    def __init__(self, status: int, detail: str, field: str | None = None, request_id: str | None = None):
        super().__init__(f"HTTP {status}: {detail}" + (f" (request id {request_id})" if request_id else ""))
        self.status = status
        self.detail = detail
        self.field = field
        self.request_id = request_id


# ------------------------------------------------------------------------------------------- images
def _array_png(array: Any, index: int) -> bytes:
    """An HWC/CHW/HW array (uint8, or float in [0, 1]) as PNG, converted as rayapp.model.images does."""
    import numpy as np
    from PIL import Image

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"images[{index}]: expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"images[{index}]: arrays must be uint8 or float in [0, 1], got {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_bytes(item: Any, index: int = 0) -> bytes:
    """Encoded image bytes: paths are read, bytes pass through, PIL images / arrays / tensors become PNG."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        with open(item, "rb") as fh:
            return fh.read()
    if hasattr(item, "save") and hasattr(item, "size"):  # a PIL image, without importing Pillow here
        buf = io.BytesIO()
        item.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    if hasattr(item, "detach") and hasattr(item, "cpu"):  # a torch tensor, without importing torch
        tensor = item.detach().cpu()
        return _array_png(tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy(), index)
    if hasattr(item, "__array__"):
        return _array_png(item, index)
    raise TypeError(f"images[{index}]: expected a path, bytes, PIL image, array or tensor, got {type(item).__name__}")


def as_image_list(images: Any) -> list:
    """A list of single images: a 4-D array/tensor batch is split along its first axis."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if getattr(images, "ndim", None) == 4:
        return [images[i] for i in range(images.shape[0])]
    return [images]


def _b64(images: Sequence[Any]) -> list[str]:
    return [base64.b64encode(image_bytes(img, i)).decode("ascii") for i, img in enumerate(images)]


def _error_from(status: int, body: bytes) -> RewardServiceError:
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        return RewardServiceError(status, str(data.get("detail", text)), data.get("field"), data.get("request_id"))
    except (json.JSONDecodeError, AttributeError):
        return RewardServiceError(status, text)


MAX_RETRY_WAIT_S = 30.0


def _backoff(attempt: int, base: float, retry_after: str | None) -> float:
    """Seconds before the next try: Retry-After plus up to as much again (so refused clients spread out), else
    exponential backoff with jitter."""
    if retry_after and retry_after.strip().isdigit():
        return min(float(retry_after) * (1.0 + random.random()), MAX_RETRY_WAIT_S)
    return min(base * (2**attempt) * (0.5 + random.random()), MAX_RETRY_WAIT_S)


def _gave_up(status: int, body: bytes, tries: int) -> RewardServiceError:
    """The last 503 as an error that says the client retried and stopped."""
    err = _error_from(status, body)
    if tries > 1:
        err = RewardServiceError(status, f"{err.detail} (gave up after {tries} tries, honouring Retry-After)",
                                 err.field, err.request_id)
    return err


# ------------------------------------------------------------------------------------------ sync client
class RewardClient:
    """Client for `rayapp.serve`: `RewardClient("http://127.0.0.1:8000").score(prompt, images)`."""

    def __init__(self, base_url: str, timeout: float = 60.0, *, token: str | None = None, model: str | None = None,
                 max_retries: int = 3, retry_backoff_s: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.token = token if token is not None else os.environ.get("RAYAPP_SERVE_TOKEN") or None
        self.model = model
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s

    def _headers(self, content_type: str | None) -> dict:
        headers = {"Content-Type": content_type} if content_type else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _request(self, path: str, payload: dict | None = None, *, data: bytes | None = None,
                 content_type: str | None = None) -> bytes:
        if payload is not None:
            data, content_type = json.dumps(payload).encode(), "application/json"
        req = urllib.request.Request(self.base_url + path, data=data, method="GET" if data is None else "POST",
                                     headers=self._headers(content_type))
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return resp.read()
            except urllib.error.HTTPError as err:
                if err.code in RETRY_STATUSES and attempt < self.max_retries:
                    time.sleep(_backoff(attempt, self.retry_backoff_s, err.headers.get("Retry-After")))
                    continue
                if err.code in RETRY_STATUSES:
                    raise _gave_up(err.code, err.read(), attempt + 1) from None
                raise _error_from(err.code, err.read()) from None
        raise AssertionError("unreachable")

    def _json(self, path: str, payload: dict | None = None, **kw) -> dict:
        return json.loads(self._request(path, payload, **kw))

    def _with_model(self, payload: dict, model: str | None) -> dict:
        model = model or self.model
        return {**payload, "model": model} if model else payload

    def score_full(self, prompt: str, images: Sequence[Any], model: str | None = None) -> dict:
        """The whole /v1/score response: scores, ranking, model, truncated_prompt, batch sizes, request_id."""
        return self._json("/v1/score", self._with_model({"prompt": prompt, "images": _b64(images)}, model))

    def score(self, prompt: str, images: Sequence[Any] | Any, model: str | None = None) -> list[float]:
        """One reward per image (a single image is also accepted and gives a one-item list)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return self.score_full(prompt, images, model)["scores"]

    def score_pairs(self, prompts: Sequence[str], images: Sequence[Any], model: str | None = None) -> list[float]:
        """Reward of images[i] under prompts[i] (up to the server's max_images)."""
        payload = self._with_model({"prompts": list(prompts), "images": _b64(images)}, model)
        return self._json("/v1/score_pairs", payload)["scores"]

    def score_batch(self, prompts: Sequence[str], images: Any, model: str | None = None) -> list[float]:
        """Reward of images[i] under prompts[i] through /v1/score_batch (raw bytes, up to max_batch_pairs)."""
        images = as_image_list(images)
        body = wire.encode_pairs(list(prompts), [image_bytes(img, i) for i, img in enumerate(images)])
        model = model or self.model
        path = "/v1/score_batch" + (f"?{urllib.parse.urlencode({'model': model})}" if model else "")
        return self._json(path, data=body, content_type=wire.CONTENT_TYPE)["scores"]

    def reward_fn(self, images: Any, prompts: Sequence[str]) -> list[float]:
        """RL-trainer shape: one reward per (image, prompt), in order."""
        return self.score_batch(prompts, images)

    def annotate(self, prompt: str, image: Any, model: str | None = None) -> bytes:
        """The image as PNG with 'ImageReward Score: x.xxxx' in its text chunks."""
        return self._request("/v1/annotate", self._with_model({"prompt": prompt, "image": _b64([image])[0]}, model))

    def models(self) -> dict:
        """GET /v1/models."""
        return self._json("/v1/models")

    def health(self) -> bool:
        """True when the endpoint and a model replica answer."""
        try:
            return self._json("/healthz").get("status") == "ok"
        except (RewardServiceError, OSError):
            return False


# ----------------------------------------------------------------------------------------- async client
class AsyncRewardClient:
    """asyncio client on a pooled httpx connection pool; use `async with AsyncRewardClient(url) as client:`."""

    def __init__(self, base_url: str, *, token: str | None = None, model: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 10.0, max_connections: int = 32, max_retries: int = 6,
                 retry_backoff_s: float = 0.5, max_pairs_per_request: int | None = None):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.token = token if token is not None else os.environ.get("RAYAPP_SERVE_TOKEN") or None
        self.model = model
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._max_pairs = max_pairs_per_request
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"Authorization": f"Bearer {self.token}"} if self.token else None,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs):
        """One request, retried (bounded; Retry-After, else backoff) on 503 and on connections dropped unanswered."""
        import httpx

        for attempt in range(self.max_retries + 1):
            try:
                resp = await self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as err:
                if attempt == self.max_retries:
                    raise
                logger.debug("retrying %s after %s", path, err)
                await asyncio.sleep(_backoff(attempt, self.retry_backoff_s, None))
                continue
            if resp.status_code in RETRY_STATUSES and attempt < self.max_retries:
                await asyncio.sleep(_backoff(attempt, self.retry_backoff_s, resp.headers.get("retry-after")))
                continue
            if resp.status_code in RETRY_STATUSES:
                raise _gave_up(resp.status_code, resp.content, attempt + 1)
            if resp.status_code >= 400:
                raise _error_from(resp.status_code, resp.content)
            return resp
        raise AssertionError("unreachable")

    async def _encode(self, images: list) -> list[bytes]:
        loop = asyncio.get_running_loop()
        # PNG encoding is CPU work; zlib and Pillow release the GIL, so threads overlap it.
        return list(await asyncio.gather(*[loop.run_in_executor(None, image_bytes, img, i)
                                           for i, img in enumerate(images)]))

    async def max_pairs(self) -> int:
        """Pairs per /v1/score_batch request: the server's max_batch_pairs unless given to the constructor."""
        if self._max_pairs is None:
            self._max_pairs = int((await self.models())["limits"]["max_batch_pairs"])
        return self._max_pairs

    async def score_batch_full(self, prompts: Sequence[str], images: Any, model: str | None = None) -> dict:
        """Like score_batch, with what scored: {scores, model, weights_sha256: one digest per pair}."""
        images, prompts = as_image_list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images; they pair one to one")
        encoded = await self._encode(images)
        step = await self.max_pairs()
        params = {"model": model or self.model} if (model or self.model) else None

        async def one(start: int) -> dict:
            body = wire.encode_pairs(prompts[start : start + step], encoded[start : start + step])
            resp = await self._send("POST", "/v1/score_batch", content=body, params=params,
                                    headers={"Content-Type": wire.CONTENT_TYPE})
            return resp.json()

        parts = await asyncio.gather(*[one(start) for start in range(0, len(prompts), step)])
        return {"scores": [score for part in parts for score in part["scores"]],
                "model": parts[0].get("model") if parts else (model or self.model),
                "weights_sha256": [part.get("weights_sha256") for part in parts for _ in part["scores"]]}

    async def score_batch(self, prompts: Sequence[str], images: Any, model: str | None = None) -> list[float]:
        """Reward of images[i] under prompts[i]; batches above the server's limit go as concurrent requests."""
        return (await self.score_batch_full(prompts, images, model))["scores"]

    async def compute_score(self, images: Any, prompts: Sequence[str], metadata: Any = None,
                            model: str | None = None) -> tuple[Any, dict]:
        """`(scores, info)` for RL trainers: scores a float32 numpy array in input order, info what scored them.

        images: a [N, 3, H, W] float tensor in [0, 1] (a diffusion pipeline's output), [N, H, W, 3] uint8 numpy,
        or a list of PIL images / arrays / paths. metadata (per-prompt dicts of the trainer) is not sent.
        """
        return _trainer_result(await self.score_batch_full(prompts, images, model))

    async def reward_fn(self, images: Any, prompts: Sequence[str]) -> list[float]:
        """RL-trainer shape: one reward per (image, prompt), in order."""
        return await self.score_batch(prompts, images)

    async def score(self, prompt: str, images: Any, model: str | None = None) -> list[float]:
        """One reward per image under one prompt (/v1/score, up to the server's max_images)."""
        images = as_image_list(images)
        payload = {"prompt": prompt, "images": [base64.b64encode(b).decode() for b in await self._encode(images)]}
        if model or self.model:
            payload["model"] = model or self.model
        return (await self._send("POST", "/v1/score", json=payload)).json()["scores"]

    async def models(self) -> dict:
        """GET /v1/models."""
        return (await self._send("GET", "/v1/models")).json()

    async def health(self) -> bool:
        """True when the endpoint and a model replica answer."""
        import httpx

        try:
            return (await self._http.get("/healthz")).json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            return False


def _trainer_result(result: dict) -> tuple[Any, dict]:
    """(float32 scores, info) from a score_batch_full result; info carries the model and its weights digest."""
    import numpy as np

    digests = list(dict.fromkeys(result["weights_sha256"]))
    info = {"model": result["model"], "weights_sha256": digests[0] if digests else None,
            "weights_sha256_all": digests}  # more than one only if the weights changed during this batch
    return np.asarray(result["scores"], dtype=np.float32), info


async def compute_score(base_url: str, images: Any, prompts: Sequence[str], metadata: Any = None,
                        **client_options: Any) -> tuple[Any, dict]:
    """One-shot `(scores, info)` over a fresh AsyncRewardClient (keep a client for a training loop instead)."""
    async with AsyncRewardClient(base_url, **client_options) as client:
        return await client.compute_score(images, prompts, metadata)


# ------------------------------------------------------------------------------------ sync reward_fn
class RewardFunction:
    """`reward_fn(images, prompts) -> list[float]` backed by an AsyncRewardClient on a private loop thread."""

    def __init__(self, base_url: str, **client_options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-fn-loop", daemon=True)
        self._thread.start()
        self._client = self._run(self._make_client(base_url, client_options))

    @staticmethod
    async def _make_client(base_url: str, options: dict) -> AsyncRewardClient:
        return AsyncRewardClient(base_url, **options)  # httpx binds its pool to the loop it is made on

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __call__(self, images: Any, prompts: Sequence[str]) -> list[float]:
        return self._run(self._client.score_batch(prompts, images))

    def close(self) -> None:
        """Close the connections and stop the loop thread."""
        if self._loop.is_running():
            self._run(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_reward_fn(base_url: str, **client_options: Any) -> RewardFunction:
    """A synchronous `reward_fn(images, prompts) -> list[float]` for RL training loops.

    client_options go to AsyncRewardClient: token, model, timeout, max_connections, max_retries, ...
    """
    return RewardFunction(base_url, **client_options)


class TrainerRewardFunction(RewardFunction):
    """`reward_fn(images, prompts, metadata) -> (scores, info)`: the shape ddpo-pytorch and flow_grpo call."""

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Any = None) -> tuple[Any, dict]:
        return self._run(self._client.compute_score(images, prompts, metadata))


def make_ddpo_reward_fn(base_url: str, **client_options: Any) -> TrainerRewardFunction:
    """A synchronous `reward_fn(images, prompts, metadata) -> (scores float32 numpy, info)` for ddpo-pytorch /
    flow_grpo style trainers; info = {model, weights_sha256, weights_sha256_all}.

    client_options go to AsyncRewardClient: token, model, timeout, max_connections, max_retries, ...
    """
    return TrainerRewardFunction(base_url, **client_options)
