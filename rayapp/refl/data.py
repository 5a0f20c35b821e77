"""ReFL inputs as Ray Datasets: prompt files (JSON / text / Parquet) and the image-text set of the
pre-training loss (Parquet with image bytes + caption), decoded and resized by Ray Data tasks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rayapp.data import storage

# Built-in training prompts for the offline default (same vocabulary as the synthetic set's captions).
TINY_TRAIN_PROMPTS = tuple(
    f"{count} {size} {colour} {shape} on a {background} background"
    for count, shape in (("one", "circle"), ("two", "squares"), ("three", "triangles"), ("one", "square"))
    for size in ("small", "large")
    for colour in ("red", "blue", "green", "yellow")
    for background in ("white", "black")
)

PROMPT_COLUMNS = ("text", "prompt", "caption")
CAPTION_COLUMNS = ("caption", "text", "prompt")
IMAGE_COLUMNS = ("image", "images", "jpg", "png", "image_bytes")


def _parquet_columns(filesystem, files: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(files[0], filesystem=filesystem).names)


def _pick(columns: list[str], preferred: str | None, candidates: tuple[str, ...], what: str, path: str) -> str:
    for name in ((preferred,) if preferred else ()) + candidates:
        if name in columns:
            return name
    looked = ", ".join(((preferred,) if preferred else ()) + candidates)
    raise ValueError(f"{path}: no {what} column (looked for {looked}); columns are {columns}")


def read_prompt_list(path: str | os.PathLike, column: str = "text") -> list[str]:
    """Prompts of a JSON or text file as a list (JSON: a list of objects with `column`, or of strings)."""
    suffix = Path(os.fspath(path)).suffix.lower()
    text = storage.read_bytes(path).decode("utf-8")
    if suffix in (".json", ".jsonl"):
        if suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = json.loads(text)
            if isinstance(items, dict):  # {"prompts": [...]} or similar single-key wrappers
                items = next(iter(items.values()))
        prompts = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                prompts.append(item)
                continue
            key = next((k for k in (column, *PROMPT_COLUMNS) if isinstance(item, dict) and k in item), None)
            if key is None:
                raise ValueError(f"{path}: item {i} has no {column!r} field: {str(item)[:80]}")
            prompts.append(str(item[key]))
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def prompt_dataset(path: str | os.PathLike | None, column: str = "text"):
    """A Ray Dataset with one string column "prompt" from a prompt file, or the built-in tiny prompts."""
    import ray.data

    if path is None:
        return ray.data.from_items([{"prompt": p} for p in TINY_TRAIN_PROMPTS])
    source = os.fspath(path)
    if storage.file_type(source) == "dir" or source.endswith(".parquet"):
        filesystem, files = storage.list_files(source)
        name = _pick(_parquet_columns(filesystem, files), column, PROMPT_COLUMNS, "prompt", source)
        ds = ray.data.read_parquet(files, filesystem=filesystem, columns=[name])
        return ds.rename_columns({name: "prompt"}) if name != "prompt" else ds
    # JSON and text prompt files are small (the reference's has 10k prompts): parse here, then let Ray Data
    # split the rows across the workers.
    return ray.data.from_items([{"prompt": p} for p in read_prompt_list(source, column)])


def _center_square(img, size: int):
    """Resize the short side to `size` (bicubic) and center-crop to size x size."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_pretrain_batch(batch: dict, *, image_column: str, caption_column: str, resolution: int,
                          ranking_column: str | None = None) -> dict:
    """Ray Data batch fn: images (bytes, or Hugging Face `{"bytes", "path"}` dicts) -> float32 [3,R,R] in
    [-1, 1] ("pixels") + "caption".

    A list-of-images column (comparison shards) contributes its best-ranked image (lowest rank), the
    one that shows the caption faithfully; without a ranking column, its first image.
    """
    from rayapp.model.images import is_image_value, load_image

    pixels, captions = [], []
    for i, item in enumerate(batch[image_column]):
        if not is_image_value(item):  # a list of images
            items = list(item)
            best = 0
            if ranking_column is not None:
                best = int(np.argmin(np.asarray(batch[ranking_column][i])))
            item = items[best]
        img = _center_square(load_image(item, i).convert("RGB"), resolution)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        pixels.append(arr)
        captions.append(str(batch[caption_column][i]))
    return {"pixels": np.stack(pixels).astype(np.float32), "caption": np.asarray(captions, dtype=object)}


def pretrain_dataset(path: str | os.PathLike, resolution: int):
    """Ray Dataset of ("pixels" [3,R,R] float32 in [-1,1], "caption") for the denoising pre-training loss."""
    import ray.data

    source = os.fspath(path)
    filesystem, files = storage.list_files(source)
    columns = _parquet_columns(filesystem, files)
    image_col = _pick(columns, None, IMAGE_COLUMNS, "image", source)
    caption_col = _pick(columns, None, CAPTION_COLUMNS, "caption", source)
    ranking_col = "ranking" if "ranking" in columns else None
    wanted = [image_col, caption_col] + ([ranking_col] if ranking_col else [])
    ds = ray.data.read_parquet(files, filesystem=filesystem, columns=wanted)
    return ds.map_batches(
        decode_pretrain_batch,
        batch_format="numpy",
        batch_size=16,
        fn_kwargs={"image_column": image_col, "caption_column": caption_col, "resolution": resolution,
                   "ranking_column": ranking_col},
    )


def infinite_batches(shard, batch_size: int, columns: tuple[str, ...]):
    """Endless numpy batches from a Ray Train dataset shard (a new epoch whenever one ends)."""
    while True:
        produced = False
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False):
            produced = True
            yield {c: batch[c] for c in columns}
        if not produced:
            raise ValueError("a dataset shard is empty: fewer rows than workers?")
