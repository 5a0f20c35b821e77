"""A small HTTP client for the reward endpoint; stdlib only, so it needs neither Ray nor requests."""
from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any


class RewardServiceError(RuntimeError):
    """The endpoint answered with an error; `status` is the HTTP code, `detail` its message."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def _image_bytes(item: Any, index: int) -> bytes:
    """Paths are read, bytes pass through, PIL images are encoded as PNG."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        with open(item, "rb") as fh:
            return fh.read()
    if hasattr(item, "save") and hasattr(item, "size"):  # a PIL image, without importing Pillow here
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"image[{index}]: expected a path, bytes or a PIL image, got {type(item).__name__}")


def _b64(images: Sequence[Any]) -> list[str]:
    return [base64.b64encode(_image_bytes(img, i)).decode("ascii") for i, img in enumerate(images)]


class RewardClient:
    """Client for `rayapp.serve`: `RewardClient("http://127.0.0.1:8000").score(prompt, images)`."""

    def __init__(self, base_url: str, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _request(self, path: str, payload: dict | None = None) -> bytes:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, method="GET" if data is None else "POST",
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            body = err.read().decode("utf-8", "replace")
            try:
                detail = json.loads(body).get("detail", body)
            except (json.JSONDecodeError, AttributeError):
                detail = body
            raise RewardServiceError(err.code, str(detail)) from None

    def _json(self, path: str, payload: dict | None = None) -> dict:
        return json.loads(self._request(path, payload))

    def score_full(self, prompt: str, images: Sequence[Any]) -> dict:
        """The whole /v1/score response: scores, ranking, model, truncated_prompt, batch sizes."""
        return self._json("/v1/score", {"prompt": prompt, "images": _b64(images)})

    def score(self, prompt: str, images: Sequence[Any] | Any) -> list[float]:
        """One reward per image (a single image is also accepted and gives a one-item list)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return self.score_full(prompt, images)["scores"]

    def score_pairs(self, prompts: Sequence[str], images: Sequence[Any]) -> list[float]:
        """Reward of images[i] under prompts[i]."""
        return self._json("/v1/score_pairs", {"prompts": list(prompts), "images": _b64(images)})["scores"]

    def annotate(self, prompt: str, image: Any) -> bytes:
        """The image as PNG with 'ImageReward Score: x.xxxx' in its text chunks."""
        return self._request("/v1/annotate", {"prompt": prompt, "image": _b64([image])[0]})

    def models(self) -> dict:
        """GET /v1/models."""
        return self._json("/v1/models")

    def health(self) -> bool:
        """True when the endpoint and a model replica answer."""
        try:
            return self._json("/healthz").get("status") == "ok"
        except (RewardServiceError, OSError):
            return False
