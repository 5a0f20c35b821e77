"""Validation and decoding of HTTP inputs, done in the ingress so a bad image never reaches a batch."""
from __future__ import annotations

import base64
import binascii
import re

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from rayapp.model.images import ImageInputError, load_image, preprocess_pil
from rayapp.serve.limits import ServeLimits

_URL = re.compile(r"^\s*(https?|ftp|file|s3|gs)://", re.IGNORECASE)
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


class InputError(Exception):
    """A request the API refuses; `status` is 4xx and `field` names the bad field or image index."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = f"{field}: {message}"


class ScoreRequest(BaseModel):
    """JSON body of POST /v1/score: one prompt, several base64-encoded images."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    images: list[str]


class ScorePairsRequest(BaseModel):
    """JSON body of POST /v1/score_pairs: prompts[i] is scored against images[i]."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str]
    images: list[str]


class AnnotateRequest(BaseModel):
    """JSON body of POST /v1/annotate: one prompt, one base64-encoded image."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    image: str


def field_name(loc: tuple) -> str:
    """('images', 2) -> 'images[2]', as users write it."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def parse_model(model: type[BaseModel], data: object) -> BaseModel:
    """Validate a decoded JSON body, turning the first schema error into a 422 that names the field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise InputError(422, field_name(tuple(first["loc"])), first["msg"]) from None


def check_prompt(prompt: object, field: str, limits: ServeLimits) -> str:
    """A non-empty prompt within the character limit."""
    if not isinstance(prompt, str):
        raise InputError(422, field, f"must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError(422, field, "must not be empty")
    if len(prompt) > limits.max_prompt_chars:
        raise InputError(
            422, field, f"has {len(prompt)} characters; the limit is {limits.max_prompt_chars}"
        )
    return prompt


def check_count(n: int, field: str, limits: ServeLimits) -> None:
    """Between 1 and max_images items."""
    if n == 0:
        raise InputError(422, field, "at least one image is required")
    if n > limits.max_images:
        raise InputError(413, field, f"{n} images; the limit is {limits.max_images} per request")


def decode_base64(data: str, field: str, limits: ServeLimits) -> bytes:
    """Base64 (optionally a data: URL) to bytes; URLs are refused because the server never fetches."""
    if _URL.match(data):
        raise InputError(422, field, "URLs are not fetched; send the image bytes base64-encoded")
    data = _DATA_URL.sub("", data, count=1)
    # Refuse before decoding: base64 is 4 characters per 3 bytes.
    if len(data) // 4 * 3 > limits.max_image_bytes + 3:
        raise InputError(413, field, f"image larger than the limit of {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InputError(422, field, f"not valid base64: {err}") from None
    return raw


def open_image(raw: bytes, field: str, limits: ServeLimits):
    """Bytes to a fully decoded PIL image, refusing oversize files and pixel bombs before decoding."""
    if len(raw) == 0:
        raise InputError(422, field, "empty image")
    if len(raw) > limits.max_image_bytes:
        raise InputError(413, field, f"{len(raw)} bytes; the limit is {limits.max_image_bytes} per image")
    try:
        return load_image(bytes(raw), None, max_pixels=limits.max_pixels)
    except ImageInputError as err:
        # load_image labels the item "image (bytes): ..."; the field name replaces that label.
        message = str(err)
        if message.startswith("image (") and "): " in message:
            message = message.split("): ", 1)[1]
        raise InputError(422, field, message) from None


def to_pixels(images: list, image_size: int) -> np.ndarray:
    """Decoded PIL images -> the model's normalised float32 batch [N, 3, S, S]."""
    return np.stack([preprocess_pil(img, image_size).numpy() for img in images]).astype(np.float32, copy=False)
