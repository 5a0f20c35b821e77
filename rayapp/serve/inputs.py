"""Validation and decoding of HTTP inputs, done in the ingress so a bad image never reaches a batch."""
from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayapp.model.images import ImageInputError, load_image
from rayapp.serve.limits import ServeLimits

_URL = re.compile(r"^\s*(https?|ftp|file|s3|gs)://", re.IGNORECASE)
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


# Why a request was refused, for the rejections metric; derived from the status when not given.
_REASON_BY_STATUS = {400: "format", 404: "model", 413: "size", 415: "format", 401: "auth"}


class InputError(Exception):
    """A request the API refuses; `status` is 4xx, `field` names the bad field or image index, `reason` its kind."""

    def __init__(self, status: int, field: str, message: str, reason: str | None = None):
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = f"{field}: {message}"
        self.reason = reason or _REASON_BY_STATUS.get(status, "format")


_MODEL_FIELD = Field(None, description="id of a served model (GET /v1/models); default: the server's default")


class ScoreRequest(BaseModel):
    """JSON body of POST /v1/score: one prompt, several base64-encoded images."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    prompt: str
    images: list[str]
    model: str | None = _MODEL_FIELD


class ScorePairsRequest(BaseModel):
    """JSON body of POST /v1/score_pairs and /v1/score_batch: prompts[i] is scored against images[i]."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    prompts: list[str]
    images: list[str]
    model: str | None = _MODEL_FIELD


class AnnotateRequest(BaseModel):
    """JSON body of POST /v1/annotate: one prompt, one base64-encoded image."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    prompt: str
    image: str
    model: str | None = _MODEL_FIELD


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
        raise InputError(422, field, "must not be empty", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InputError(
            422, field, f"has {len(prompt)} characters; the limit is {limits.max_prompt_chars}", "prompt"
        )
    return prompt


def check_count(n: int, field: str, limits: ServeLimits, most: int | None = None) -> None:
    """Between 1 and `most` (default max_images) items."""
    most = limits.max_images if most is None else most
    if n == 0:
        raise InputError(422, field, "at least one image is required", "count")
    if n > most:
        raise InputError(413, field, f"{n} images; the limit is {most} per request", "count")


def decode_base64(data: str, field: str, limits: ServeLimits) -> bytes:
    """Base64 (optionally a data: URL) to bytes; URLs are refused because the server never fetches."""
    if _URL.match(data):
        raise InputError(422, field, "URLs are not fetched; send the image bytes base64-encoded", "format")
    data = _DATA_URL.sub("", data, count=1)
    # Refuse before decoding: base64 is 4 characters per 3 bytes.
    if len(data) // 4 * 3 > limits.max_image_bytes + 3:
        raise InputError(413, field, f"image larger than the limit of {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InputError(422, field, f"not valid base64: {err}", "decode") from None
    return raw


def open_image(raw: bytes, field: str, limits: ServeLimits):
    """Bytes to a fully decoded PIL image, refusing oversize files and pixel bombs before decoding."""
    if len(raw) == 0:
        raise InputError(422, field, "empty image", "decode")
    if len(raw) > limits.max_image_bytes:
        raise InputError(413, field, f"{len(raw)} bytes; the limit is {limits.max_image_bytes} per image", "size")
    raw = bytes(raw)
    try:
        with Image.open(io.BytesIO(raw)) as probe:  # header only: the size is known before any pixel is decoded
            width, height = probe.size
    except Exception:  # noqa: BLE001 -- load_image below reports undecodable data with its reason
        width = height = 0
    if width * height > limits.max_pixels:
        raise InputError(422, field, f"{width}x{height} = {width * height} pixels exceeds the limit of "
                                     f"{limits.max_pixels}", "pixels")
    try:
        return load_image(raw, None, max_pixels=limits.max_pixels)
    except ImageInputError as err:
        # load_image labels the item "image (bytes): ..."; the field name replaces that label.
        message = str(err)
        if message.startswith("image (") and "): " in message:
            message = message.split("): ", 1)[1]
        raise InputError(422, field, message, "decode") from None
