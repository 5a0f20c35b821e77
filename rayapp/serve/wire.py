"""The length-prefixed binary body of POST /v1/score_batch: (prompt, image bytes) pairs without base64.

Content-Type: application/x-rayapp-pairs. Every integer is an unsigned 32-bit big-endian number:

    magic   4 bytes  b"RWP1"
    count   u32      number of pairs N
    N times:
        prompt_len  u32      bytes of the UTF-8 prompt
        prompt      prompt_len bytes, UTF-8
        image_len   u32      bytes of the encoded image (PNG, JPEG, WebP, ...)
        image       image_len bytes, exactly as the file on disk
    nothing after the last pair

Stdlib only, so RL trainers can import it without Ray, FastAPI or torch (`rayapp.serve.wire.encode_pairs`).
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

MAGIC = b"RWP1"
CONTENT_TYPE = "application/x-rayapp-pairs"
_U32 = struct.Struct(">I")
_HEADER = len(MAGIC) + _U32.size


class WireFormatError(ValueError):
    """A malformed body; `field` names the pair (pairs[3].image) or part at fault, `reason` its kind."""

    def __init__(self, field: str, message: str, reason: str = "format", status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason
        self.status = status


def encode_pairs(prompts: Sequence[str], images: Sequence[bytes]) -> bytes:
    """The body for N (prompt, encoded image) pairs, in order."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images; they pair one to one")
    parts = [MAGIC, _U32.pack(len(prompts))]
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise TypeError(f"images[{i}] must be encoded image bytes, got {type(image).__name__}")
        text = prompt.encode("utf-8")
        parts += [_U32.pack(len(text)), text, _U32.pack(len(image)), bytes(image)]
    return b"".join(parts)


def decode_pairs(body: bytes | memoryview, *, max_pairs: int, max_prompt_bytes: int,
                 max_image_bytes: int) -> list[tuple[str, memoryview]]:
    """[(prompt, image bytes)] from a body, refusing before reading past any declared limit."""
    view = memoryview(body)
    if len(view) < _HEADER or bytes(view[:4]) != MAGIC:
        raise WireFormatError("body", f"not a {CONTENT_TYPE} body: it must start with {MAGIC!r} and a u32 count")
    (count,) = _U32.unpack_from(view, 4)
    if count == 0:
        raise WireFormatError("pairs", "at least one pair is required", reason="count")
    if count > max_pairs:
        raise WireFormatError("pairs", f"{count} pairs; the limit is {max_pairs} per request", "count", 413)
    pos, pairs = _HEADER, []
    for i in range(count):
        prompt_len, pos = _length(view, pos, f"pairs[{i}].prompt")
        if prompt_len > max_prompt_bytes:
            raise WireFormatError(f"pairs[{i}].prompt", f"{prompt_len} bytes; the limit is {max_prompt_bytes}",
                                  "prompt")
        raw_prompt, pos = _take(view, pos, prompt_len, f"pairs[{i}].prompt")
        try:
            prompt = bytes(raw_prompt).decode("utf-8")
        except UnicodeDecodeError as err:
            raise WireFormatError(f"pairs[{i}].prompt", f"not valid UTF-8: {err.reason}", "prompt") from None
        image_len, pos = _length(view, pos, f"pairs[{i}].image")
        if image_len > max_image_bytes:
            raise WireFormatError(f"pairs[{i}].image", f"{image_len} bytes; the limit is {max_image_bytes} per image",
                                  "size", 413)
        image, pos = _take(view, pos, image_len, f"pairs[{i}].image")
        pairs.append((prompt, image))
    if pos != len(view):
        raise WireFormatError("body", f"{len(view) - pos} bytes after the last of {count} pairs")
    return pairs


def _length(view: memoryview, pos: int, field: str) -> tuple[int, int]:
    if pos + _U32.size > len(view):
        raise WireFormatError(field, "body ends inside the length prefix")
    return _U32.unpack_from(view, pos)[0], pos + _U32.size


def _take(view: memoryview, pos: int, size: int, field: str) -> tuple[memoryview, int]:
    if pos + size > len(view):
        raise WireFormatError(field, f"declares {size} bytes but the body ends after {len(view) - pos}")
    return view[pos : pos + size], pos + size
