"""Pairwise preference tables -> comparison shards (two-image rows).

- Pick-a-Pic v2 style ("pickapic"): `caption`, `jpg_0`, `jpg_1` (encoded images), `label_0`, `label_1`
  (1/0 or 0/1 for a preference, 0.5/0.5 for a tie). A tie is kept as equal ranks ([1, 1]), which the pair
  pipeline skips; a row with `has_label` false is bad. The row id is `ranking_id` when the table has one.
- plain pairs ("pairs"): `prompt`, `image_better`, `image_worse` -> ranking [1, 2]; the id is `id` when present.

Otherwise a row's id is `<file>:<row>`. Tables are Parquet (a file or a directory, local or URI), or the Arrow
files `datasets.Dataset.save_to_disk` writes. Image cells may be bytes, Hugging Face Datasets image dicts
(`{"bytes", "path"}`; bytes win) or path strings, which are read relative to `image_root` (default: the
table's directory).
"""
from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from rayapp.data import storage
from rayapp.data.conversion import Candidate, ConvertReport, check_image, write_converted
from rayapp.data.shards import COMPARISON_SCHEMA, DEFAULT_ROWS_PER_SHARD

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
PAIRS_COLUMNS = ("prompt", "image_better", "image_worse")


def columns_needed(fmt: str) -> tuple[str, ...]:
    """The columns a pair-table format needs."""
    return PICKAPIC_COLUMNS if fmt == "pickapic" else PAIRS_COLUMNS


def format_for_columns(columns) -> str | None:
    """"pickapic" / "pairs" when the columns hold one of them, else None."""
    names = set(columns)
    if set(PICKAPIC_COLUMNS) <= names:
        return "pickapic"
    if set(PAIRS_COLUMNS) <= names:
        return "pairs"
    return None


def table_files(source: str | os.PathLike):
    """(filesystem, files, "parquet" | "arrow") of a table file or directory."""
    filesystem, files = storage.list_files(source, storage.PARQUET_SUFFIXES, missing_ok=True)
    if files:
        return filesystem, files, "parquet"
    filesystem, files = storage.list_files(source, storage.ARROW_SUFFIXES, missing_ok=True)
    if files:
        return filesystem, files, "arrow"
    raise FileNotFoundError(f"no *.parquet or *.arrow files at {os.fspath(source)}")


def _arrow_reader(filesystem, path: str):
    """A record-batch reader of an Arrow IPC file, stream format (what `datasets` writes) or file format."""
    import pyarrow as pa

    handle = filesystem.open_input_file(path)
    try:
        return pa.ipc.open_stream(handle)
    except pa.ArrowInvalid:
        handle.seek(0)
        return pa.ipc.open_file(handle)


def _schema(filesystem, path: str, kind: str):
    import pyarrow.parquet as pq

    if kind == "parquet":
        return pq.ParquetFile(filesystem.open_input_file(path)).schema_arrow
    return _arrow_reader(filesystem, path).schema


def table_columns(source: str | os.PathLike) -> list[str]:
    """Column names of a table (its first file)."""
    filesystem, files, kind = table_files(source)
    with storage.errors_named(source):
        return list(_schema(filesystem, files[0], kind).names)


def iter_rows(source: str | os.PathLike, columns: list[str], batch_size: int = 64
              ) -> Iterator[list[tuple[str, dict]]]:
    """Batches of (default id "<file>:<row>", row dict) over every file of the table."""
    import pyarrow.parquet as pq

    filesystem, files, kind = table_files(source)
    base = storage.resolve(source)[1]
    for path in files:
        rel = posixpath.basename(path) if len(files) == 1 else posixpath.relpath(path, base)
        schema = _schema(filesystem, path, kind)
        wanted = [c for c in columns if c in schema.names]
        if kind == "parquet":
            batches = pq.ParquetFile(filesystem.open_input_file(path)).iter_batches(batch_size=batch_size,
                                                                                    columns=wanted)
        else:
            batches = (b.select(wanted) for b in _arrow_reader(filesystem, path))
        row = 0
        for batch in batches:
            out = []
            for values in batch.to_pylist():
                out.append((f"{rel}:{row}", values))
                row += 1
            yield out


def _base_dir(source: str | os.PathLike, image_root: str | os.PathLike | None) -> str:
    """Where relative image paths in a table point: `image_root`, else the table's own directory."""
    if image_root is not None:
        return os.fspath(image_root)
    text = os.fspath(source)
    if storage.file_type(text) == "file":
        return text.rsplit("/", 1)[0] if storage.is_uri(text) else os.path.dirname(os.path.abspath(text))
    return text


def cell_bytes(value, base: str) -> tuple[bytes | None, str | None]:
    """(encoded bytes, None) of an image cell -- bytes, HF image dict or path -- or (None, why not)."""
    from rayapp.model.images import image_bytes, is_hf_image

    data = image_bytes(value)
    if data is not None:
        return (data, None) if len(data) else (None, "empty image bytes")
    path = value.get("path") if is_hf_image(value) else value
    if isinstance(path, str) and path:
        full = path if (os.path.isabs(path) or storage.is_uri(path)) else storage.join(base, path)
        try:
            return storage.read_bytes(full), None
        except (FileNotFoundError, IsADirectoryError):
            return None, f"missing image file {full}"
    return None, "no image"


def ranking_from_labels(label_0, label_1) -> list[int]:
    """[1, 2] when image 0 is preferred, [2, 1] for image 1, [1, 1] for a tie; ValueError for bad labels."""
    values = []
    for name, value in (("label_0", label_0), ("label_1", label_1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} is {value!r}, not a number")
        values.append(float(value))
    if values[0] == values[1]:
        return [1, 1]
    return [1, 2] if values[0] > values[1] else [2, 1]


def pickapic_candidate(default_id: str, row: dict, base: str) -> Candidate:
    """One Pick-a-Pic row as a two-image comparison row, or why it is bad."""
    row_id = str(row["ranking_id"]) if row.get("ranking_id") not in (None, "") else default_id
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return Candidate(row_id, reason="empty or missing caption")
    if row.get("has_label") is False:
        return Candidate(row_id, reason="has_label is false (no preference recorded)")
    try:
        ranking = ranking_from_labels(row.get("label_0"), row.get("label_1"))
    except ValueError as err:
        return Candidate(row_id, reason=str(err))
    return _with_images(row_id, caption, [row.get("jpg_0"), row.get("jpg_1")], ["jpg_0", "jpg_1"], ranking, base)


def pairs_candidate(default_id: str, row: dict, base: str) -> Candidate:
    """One (prompt, image_better, image_worse) row as a two-image comparison row, or why it is bad."""
    row_id = str(row["id"]) if row.get("id") not in (None, "") else default_id
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return Candidate(row_id, reason="empty or missing prompt")
    return _with_images(row_id, prompt, [row.get("image_better"), row.get("image_worse")],
                        ["image_better", "image_worse"], [1, 2], base)


def _with_images(row_id: str, prompt: str, cells: list, names: list[str], ranking: list[int], base: str
                 ) -> Candidate:
    images = []
    for cell, name in zip(cells, names):
        data, why = cell_bytes(cell, base)
        reason = f"{name}: {why}" if data is None else check_image(data, name)
        if reason is not None:
            return Candidate(row_id, reason=reason)
        images.append(data)
    return Candidate(row_id, row={"id": row_id, "prompt": prompt, "images": images, "ranking": ranking})


def convert_pair_table(source: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str,
                       image_root: str | os.PathLike | None = None, skip_bad: bool = False,
                       rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, overwrite: bool = False,
                       progress: bool = True) -> ConvertReport:
    """Convert a Pick-a-Pic-style ("pickapic") or plain ("pairs") preference table to comparison shards."""
    if fmt not in ("pickapic", "pairs"):
        raise ValueError(f"not a pair-table format: {fmt!r}")
    columns = table_columns(source)
    missing = [c for c in columns_needed(fmt) if c not in columns]
    if missing:
        raise ValueError(f"{os.fspath(source)}: --format {fmt} needs columns {', '.join(columns_needed(fmt))}; "
                         f"missing {', '.join(missing)} (found {', '.join(columns)})")
    base = _base_dir(source, image_root)
    make = pickapic_candidate if fmt == "pickapic" else pairs_candidate
    wanted = list(columns_needed(fmt)) + ["ranking_id", "has_label", "id"]

    def candidates() -> Iterator[Candidate]:
        # decoding checks dominate; Pillow releases the GIL, so a few threads check a batch at once
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            for batch in iter_rows(source, wanted):
                yield from pool.map(lambda item: make(item[0], item[1], base), batch)

    return write_converted(candidates(), out_dir, fmt=fmt, schema=COMPARISON_SCHEMA, skip_bad=skip_bad,
                           rows_per_shard=rows_per_shard, overwrite=overwrite, progress=progress,
                           desc=f"convert {fmt}")
