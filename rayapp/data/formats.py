"""Converting comparison data to Parquet shards (format b): ImageRewardDB-style JSON, and the format dispatch.

Sources (`convert_source(..., fmt=...)`, "auto" picks by what it finds and says which):
- "json":          a JSON list (or `.jsonl`) of `{id, prompt, generations: [paths relative to an image root],
                   ranking: [ints]}` (lower rank = better, ties allowed) -- the GitHub `test.json` shape;
- "imagerewarddb": the hub release of ImageRewardDB (`rayapp.data.imagerewarddb`);
- "pickapic":      Pick-a-Pic-style pairs: `caption, jpg_0, jpg_1, label_0, label_1` (`rayapp.data.pair_tables`);
- "pairs":         a plain `prompt, image_better, image_worse` table (`rayapp.data.pair_tables`).

Conversion never drops a record silently: bad ones fail the run with every id listed (and no output left
behind), or with `skip_bad` are skipped and reported. The shard writing itself, shared by every format, is
`rayapp.data.conversion`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

from rayapp.data import imagerewarddb, pair_tables, storage
from rayapp.data.conversion import BadRecordsError as BadRecordsError  # callers catch it from here
from rayapp.data.conversion import Candidate, ConvertReport, check_image, write_converted
from rayapp.data.shards import DEFAULT_ROWS_PER_SHARD

FORMATS = ("json", "imagerewarddb", "pickapic", "pairs")


# --------------------------------------------------------------------------------------------- JSON
def load_json_records(path: str | os.PathLike) -> list:
    """The records of a JSON list file or a JSON Lines file (local path or URI)."""
    text_path = os.fspath(path)
    if storage.file_type(text_path) != "file":
        raise FileNotFoundError(f"no JSON file at {text_path}")
    text = storage.read_bytes(text_path).decode("utf-8")
    if text_path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{text_path}: expected a JSON list of records, got {type(data).__name__}")  # noqa: TRY004
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
    images = []
    for index, rel in enumerate(record["generations"]):
        path = storage.join(image_root, rel)
        try:
            data = storage.read_bytes(path)
        except (FileNotFoundError, IsADirectoryError):
            return None, f"generations[{index}]: missing image file {path}"
        reason = check_image(data, f"generations[{index}]")
        if reason is not None:
            return None, f"{reason.replace('cannot decode image', f'cannot decode image file {path}')}"
        images.append(data)
    return images, None


def json_candidates(records: list, image_root: str | os.PathLike) -> Iterable[Candidate]:
    """One candidate per JSON record, images read from `image_root` and checked."""
    for position, record in enumerate(records):
        label = record_label(record, position)
        reason = check_fields(record)
        if reason is not None:
            yield Candidate(label, reason=reason)
            continue
        images, reason = read_images(record, image_root)
        if reason is not None:
            yield Candidate(label, reason=reason)
            continue
        yield Candidate(label, row={"id": str(record["id"]), "prompt": record["prompt"], "images": images,
                                    "ranking": list(record["ranking"])})


def convert(json_path: str | os.PathLike, image_root: str | os.PathLike, out_dir: str | os.PathLike, *,
            skip_bad: bool = False, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, overwrite: bool = False,
            progress: bool = True) -> ConvertReport:
    """Convert ImageRewardDB-style JSON to Parquet shards in `out_dir`, images inline (paths or URIs).

    Without `skip_bad`, any bad record (missing/undecodable image, ranking length != generations, empty prompt,
    duplicate id, ...) raises `BadRecordsError` listing all of them and leaves no output behind.
    """
    if storage.file_type(image_root) != "dir":
        raise FileNotFoundError(f"image root {os.fspath(image_root)} is not a directory")
    records = load_json_records(json_path)
    return write_converted(json_candidates(records, image_root), out_dir, fmt="json", skip_bad=skip_bad,
                           rows_per_shard=rows_per_shard, overwrite=overwrite, progress=progress,
                           total=len(records))


# --------------------------------------------------------------------------------------------- dispatch
def detect_format(source: str | os.PathLike) -> tuple[str, str]:
    """(format, why) for a source path or URI, from its name, layout or columns."""
    text = os.fspath(source)
    kind = storage.file_type(text)
    if kind == "missing":
        raise FileNotFoundError(f"no file or directory at {text}")
    if kind == "file" and text.endswith((".json", ".jsonl")):
        return "json", "a .json/.jsonl file"
    if kind == "dir":
        found = imagerewarddb.looks_like_hub_layout(text)
        if found:
            return "imagerewarddb", found
    columns = pair_tables.table_columns(text)
    picked = pair_tables.format_for_columns(columns)
    if picked is None:
        names = ", ".join(sorted(columns)) or "none"
        if {"id", "prompt", "images", "ranking"} <= set(columns):
            raise ValueError(f"{text} already holds comparison shards (id, prompt, images, ranking): use it as is")
        raise ValueError(
            f"cannot tell the format of {text} (columns: {names}); expected a .json file, an ImageRewardDB folder "
            f"(metadata-*.parquet, images/<split>/), Pick-a-Pic columns {', '.join(pair_tables.PICKAPIC_COLUMNS)} "
            f"or pairs columns {', '.join(pair_tables.PAIRS_COLUMNS)}; or pass --format")
    return picked, f"columns {', '.join(pair_tables.columns_needed(picked))}"


def convert_source(source: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str = "auto",
                   image_root: str | os.PathLike | None = None, splits: Iterable[str] | None = None,
                   subset: str | None = None, skip_bad: bool = False, rows_per_shard: int | None = None,
                   overwrite: bool = False, progress: bool = True,
                   on_detect: Callable[[str, str], None] | None = None) -> list[ConvertReport]:
    """Convert any supported source; one report per written directory (one per split for ImageRewardDB)."""
    note = ""
    if fmt == "auto":
        fmt, why = detect_format(source)
        note = f"--format auto picked {fmt} ({why})"
        if on_detect is not None:
            on_detect(fmt, why)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    if fmt != "imagerewarddb" and (splits or subset):
        raise ValueError("--split and --subset apply to --format imagerewarddb only")
    options = {"skip_bad": skip_bad, "overwrite": overwrite, "progress": progress}
    if rows_per_shard is not None:
        options["rows_per_shard"] = rows_per_shard
    if fmt == "json":
        if image_root is None:
            raise ValueError("--image-root is required for JSON input (the directory the generation paths are "
                             "relative to)")
        reports = [convert(source, image_root, out_dir, **options)]
    elif fmt == "imagerewarddb":
        reports = imagerewarddb.convert_hub(source, out_dir, splits=splits, subset=subset, **options)
    else:
        reports = [pair_tables.convert_pair_table(source, out_dir, fmt=fmt, image_root=image_root, **options)]
    for report in reports:
        report.note = "; ".join(n for n in (note, report.note) if n)
    return reports
