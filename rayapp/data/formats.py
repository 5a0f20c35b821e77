"""ImageRewardDB-style JSON comparisons (format a): reading, validation, and conversion to Parquet shards (b).

A JSON file is a list of `{id, prompt, generations: [image paths relative to an image root], ranking: [ints]}`
(lower rank = better, ties allowed); `.jsonl` files hold one such object per line. Conversion never drops a
record silently: bad ones fail the run with every id listed, or with `skip_bad` are skipped and reported.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rayapp.data.pairs import count_pairs
from rayapp.data.shards import DEFAULT_ROWS_PER_SHARD, ShardWriter


class BadRecordsError(ValueError):
    """Some records cannot be converted; `.bad` lists (id, reason) for each."""

    def __init__(self, bad: list[tuple[str, str]], total: int):
        self.bad = bad
        shown = "\n".join(f"  {rid}: {reason}" for rid, reason in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        super().__init__(f"{len(bad)} of {total} records are bad (rerun with --skip-bad to skip them):\n{shown}{more}")


@dataclass
class ConvertReport:
    """What a conversion wrote and what it skipped."""

    out_dir: str
    rows: int = 0
    images: int = 0
    pairs: int = 0
    shards: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (record id, reason) of skipped records


def load_json_records(path: str | os.PathLike) -> list:
    """The records of a JSON list file or a JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSON file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")  # noqa: TRY004
    return data


def record_label(record, position: int) -> str:
    """The record's id, or its position in the file when it has none."""
    if isinstance(record, dict) and record.get("id") not in (None, ""):
        return str(record["id"])
    return f"record[{position}] (no id)"


def check_fields(record) -> str | None:
    """Why the record's fields are unusable, or None (images are not opened here)."""
    if not isinstance(record, dict):
        return f"not an object ({type(record).__name__})"
    if record.get("id") in (None, ""):
        return "missing id"
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "empty or missing prompt"
    generations, ranking = record.get("generations"), record.get("ranking")
    if not isinstance(generations, list) or not generations:
        return "generations must be a non-empty list of image paths"
    if not all(isinstance(g, str) and g for g in generations):
        return "every generation must be a non-empty path string"
    if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
        return "ranking must be a list of integers"
    if len(ranking) != len(generations):
        return f"ranking has {len(ranking)} entries but there are {len(generations)} generations"
    return None


def read_images(record: dict, image_root: str | os.PathLike) -> tuple[list[bytes] | None, str | None]:
    """The record's encoded image bytes, each checked to decode; or (None, reason naming the image)."""
    from rayapp.model.images import ImageInputError, load_image

    images = []
    for index, rel in enumerate(record["generations"]):
        path = Path(image_root) / rel
        if not path.is_file():
            return None, f"generations[{index}]: missing image file {path}"
        data = path.read_bytes()
        try:
            load_image(data, index)
        except ImageInputError as err:
            cause = type(err.__cause__).__name__ if err.__cause__ is not None else "ImageInputError"
            return None, f"generations[{index}]: cannot decode image file {path} ({cause})"
        images.append(data)
    return images, None


def convert(json_path: str | os.PathLike, image_root: str | os.PathLike, out_dir: str | os.PathLike, *,
            skip_bad: bool = False, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, overwrite: bool = False,
            progress: bool = True) -> ConvertReport:
    """Convert ImageRewardDB-style JSON to Parquet shards in `out_dir`, images inline.

    Without `skip_bad`, any bad record (missing/undecodable image, ranking length != generations, empty prompt,
    duplicate id, ...) raises `BadRecordsError` listing all of them and leaves no output behind.
    """
    from tqdm import tqdm

    image_root = Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(f"image root {image_root} is not a directory")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass overwrite / --overwrite to replace it")
    records = load_json_records(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Shards go to a sibling temp dir first, so a failed run never leaves a half-written dataset at `out`.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    report = ConvertReport(out_dir=str(out))
    seen: set[str] = set()
    try:
        with ShardWriter(staging, rows_per_shard=rows_per_shard) as writer:
            for position, record in enumerate(tqdm(records, desc="convert", unit="prompt", disable=not progress)):
                label = record_label(record, position)
                reason = check_fields(record)
                if reason is None and str(record["id"]) in seen:
                    reason = "duplicate id"
                images = None
                if reason is None:
                    images, reason = read_images(record, image_root)
                if reason is not None:
                    report.bad.append((label, reason))
                    continue
                seen.add(str(record["id"]))
                writer.write({"id": str(record["id"]), "prompt": record["prompt"], "images": images,
                              "ranking": list(record["ranking"])})
                report.rows += 1
                report.images += len(images)
                report.pairs += count_pairs(record["ranking"])
        if report.bad and not skip_bad:
            raise BadRecordsError(report.bad, len(records))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        report.shards = [str(out / p.name) for p in writer.paths]
        return report
    finally:
        if staging.exists():
            shutil.rmtree(staging)
