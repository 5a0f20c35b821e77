"""Image inputs and preprocessing: one PIL path for scoring, one tensor path for gradients.

The PIL path reproduces the reference package's torchvision pipeline bit for bit
(Resize(short side, bicubic) -> CenterCrop -> RGB -> ToTensor -> Normalize); the
tensor path is its differentiable approximation used by ReFL (`ImageReward.reward`).
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's own bomb guard is a warning at 89 Mpx; we refuse earlier and always raise.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageInputError(ValueError):
    """An image input that cannot be decoded; the message names the offending item."""


def _describe(item: Any, index: int | None) -> str:
    where = f"image[{index}]" if index is not None else "image"
    if isinstance(item, (str, os.PathLike)):
        return f"{where} ({os.fspath(item)!r})"
    if is_hf_image(item) and item.get("path"):
        return f"{where} (image dict, path {item['path']!r})"
    return f"{where} ({type(item).__name__})"


def is_hf_image(item: Any) -> bool:
    """A Hugging Face Datasets image value: a mapping with "bytes" and/or "path" (the `Image` feature's storage)."""
    return isinstance(item, Mapping) and ("bytes" in item or "path" in item)


def is_image_value(item: Any) -> bool:
    """True for one image input (anything `load_image` takes), False for a list / array of several."""
    if isinstance(item, np.ndarray):
        return item.dtype != object
    return isinstance(item, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview, torch.Tensor)) \
        or is_hf_image(item)


def image_bytes(item: Any, index: int | None = None) -> bytes | None:
    """The encoded bytes of a bytes-like or HF image dict input (None for other kinds, e.g. paths, PIL)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if is_hf_image(item) and item.get("bytes") is not None:
        return bytes(item["bytes"])
    return None


def _array_to_pil(array: np.ndarray, label: str) -> Image.Image:
    """HWC / HW arrays, uint8 in [0,255] or float in [0,1]; CHW is accepted when unambiguous."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageInputError(f"{label}: expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ImageInputError(f"{label}: arrays must be uint8 or float in [0, 1], got {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _open_checked(source: Any, label: str, max_pixels: int) -> Image.Image:
    """Open with Pillow, refuse decompression bombs before decoding, force a full decode."""
    try:
        img = Image.open(source)
        width, height = img.size
        if width * height > max_pixels:
            raise ImageInputError(
                f"{label}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
            )
        img.load()  # truncated or corrupt data fails here, not later inside a batch
        return img
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageInputError(f"{label}: cannot decode image: {err}") from err


def load_image(item: Any, index: int | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Turn one image input (PIL, path, bytes, HF `{"bytes", "path"}` dict, numpy array, tensor) into a PIL
    image, or raise naming it. A dict's bytes win over its path (Datasets keeps the original file name there)."""
    label = _describe(item, index)
    if isinstance(item, Image.Image):
        return item
    if is_hf_image(item):
        data, path = item.get("bytes"), item.get("path")
        if data is not None and len(data) > 0:
            return _open_checked(io.BytesIO(bytes(data)), label, max_pixels)
        if path:
            if not Path(path).is_file():
                raise ImageInputError(f"{label}: no bytes and no such file")
            return _open_checked(Path(path), label, max_pixels)
        raise ImageInputError(f"{label}: image dict has neither bytes nor a path")
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise ImageInputError(f"{label}: no such file")
        return _open_checked(path, label, max_pixels)
    if isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise ImageInputError(f"{label}: empty bytes")
        return _open_checked(io.BytesIO(bytes(item)), label, max_pixels)
    if isinstance(item, torch.Tensor):
        tensor = item.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.float()
        return _array_to_pil(tensor.numpy(), label)
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, label)
    raise ImageInputError(
        f"{label}: unsupported type {type(item).__name__}; pass a PIL image, path, bytes, "
        f"{{'bytes', 'path'}} dict, numpy array or tensor"
    )


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """torchvision Resize(int): short side to image_size, long side int(image_size * long / short)."""
    if width <= height:
        return image_size, int(image_size * height / width)
    return int(image_size * width / height), image_size


def crop_uint8(img: Image.Image, image_size: int) -> np.ndarray:
    """The reference's geometry: bicubic short-side resize, center crop, RGB -> uint8 [S,S,3]."""
    new_w, new_h = resized_size(*img.size, image_size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = round((new_w - image_size) / 2.0)
    top = round((new_h - image_size) / 2.0)
    img = img.crop((left, top, left + image_size, top + image_size))
    img = img.convert("RGB")  # after the crop, as the reference does (matters for palette / alpha images)
    return np.asarray(img, dtype=np.uint8)


_MEAN_NP = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
_STD_NP = np.asarray(CLIP_STD, dtype=np.float32).reshape(1, 3, 1, 1)


def normalize_uint8(batch_hwc: np.ndarray) -> np.ndarray:
    """uint8 [N,S,S,3] -> float32 [N,3,S,S]: /255 then CLIP mean/std, in float32 (whole batch at once)."""
    pixels = np.ascontiguousarray(batch_hwc.transpose(0, 3, 1, 2)).astype(np.float32)
    pixels /= np.float32(255.0)
    pixels -= _MEAN_NP
    pixels /= _STD_NP
    return pixels


def preprocess_pil(img: Image.Image, image_size: int) -> torch.Tensor:
    """Reference preprocessing: bicubic short-side resize, center crop, RGB, [0,1], CLIP normalise -> [3,S,S]."""
    return torch.from_numpy(normalize_uint8(crop_uint8(img, image_size)[None])[0])


def preprocess_tensor(images_0_1: torch.Tensor, image_size: int) -> torch.Tensor:
    """Differentiable twin of `preprocess_pil` for a [B,3,H,W] batch in [0,1] (antialiased bicubic)."""
    if images_0_1.ndim != 4 or images_0_1.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images_0_1.shape)}")
    height, width = images_0_1.shape[-2:]
    new_w, new_h = resized_size(width, height, image_size)
    x = images_0_1
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top = round((new_h - image_size) / 2.0)
    left = round((new_w - image_size) / 2.0)
    x = x[:, :, top : top + image_size, left : left + image_size]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
