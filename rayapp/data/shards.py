"""Parquet comparison shards (format b): the schema, a streaming shard writer, publishing, a streaming reader.

One row per prompt: `id`, `prompt`, `images` (encoded PNG/JPEG/WebP bytes), `ranking` (lower = better,
ties allowed); the synthetic set adds per-image `faithfulness` and `quality` (its ranking rule's inputs);
ImageRewardDB adds its per-image ratings and classification (RATING_COLUMNS, `classification`).
Readers take local paths or URIs (`rayapp.data.storage`); the writer stages locally and `publish_dir`
moves / uploads the finished directory.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COMPARISON_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("images", pa.list_(pa.binary()), nullable=False),
    pa.field("ranking", pa.list_(pa.int32()), nullable=False),
]
SYNTH_FIELDS = [
    pa.field("faithfulness", pa.list_(pa.int32()), nullable=False),
    pa.field("quality", pa.list_(pa.int32()), nullable=False),
]
# ImageRewardDB's per-image annotations, named as in its release (ratings 1-7; null where missing)
RATING_COLUMNS = ("overall_rating", "image_text_alignment_rating", "fidelity_rating")
IMAGEREWARDDB_FIELDS = [pa.field(name, pa.list_(pa.int32()), nullable=False) for name in RATING_COLUMNS] + [
    pa.field("classification", pa.list_(pa.string()), nullable=False),
]
COMPARISON_SCHEMA = pa.schema(COMPARISON_FIELDS)
SYNTH_SCHEMA = pa.schema(COMPARISON_FIELDS + SYNTH_FIELDS)
IMAGEREWARDDB_SCHEMA = pa.schema(COMPARISON_FIELDS + IMAGEREWARDDB_FIELDS)
DEFAULT_ROWS_PER_SHARD = 256
# prompts per Parquet row group: the unit one pipeline task reads, so one shard feeds several tasks
ROWS_PER_ROW_GROUP = 32


class ShardWriter:
    """Writes rows to local `out_dir/part-NNNNN.parquet`: a file holds `rows_per_shard` rows, or fewer once its
    images reach `bytes_per_shard` bytes (real photos are ~0.5 MB each); one shard is held in memory at most."""

    def __init__(self, out_dir: str | os.PathLike, schema: pa.Schema = COMPARISON_SCHEMA,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, bytes_per_shard: int | None = None):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.bytes_per_shard = bytes_per_shard
        self.rows_written = 0
        self.paths: list[Path] = []
        self._pending: list[dict] = []
        self._pending_bytes = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        self._pending.append(row)
        self._pending_bytes += sum(len(image) for image in row.get("images") or ())
        if len(self._pending) >= self.rows_per_shard or (
                self.bytes_per_shard is not None and self._pending_bytes >= self.bytes_per_shard):
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        columns = {f.name: [row[f.name] for row in self._pending] for f in self.schema}
        table = pa.Table.from_pydict(columns, schema=self.schema)
        path = self.out_dir / f"part-{len(self.paths):05d}.parquet"
        pq.write_table(table, path, row_group_size=ROWS_PER_ROW_GROUP)
        self.paths.append(path)
        self.rows_written += len(self._pending)
        self._pending = []
        self._pending_bytes = 0

    def close(self) -> list[Path]:
        self.flush()
        return self.paths

    def __enter__(self) -> ShardWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """An empty local output directory; refuses to mix new shards with old ones unless `overwrite`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; pass overwrite / --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a non-empty output dir (local or URI) unless `overwrite`; checks a URI's bucket is reachable."""
    from rayapp.data import storage

    if storage.is_uri(out_dir):
        storage.ensure_writable_dir(out_dir)
    if storage.list_files(out_dir, suffixes=None, missing_ok=True)[1] and not overwrite:
        raise FileExistsError(f"output directory {os.fspath(out_dir)} is not empty; pass overwrite / --overwrite "
                              f"to replace it")


def publish_dir(staging: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Replace `out_dir` (local or URI) by the finished local `staging` dir: a rename when both are local
    on one filesystem, else a copy (then `staging` is left for the caller to remove)."""
    from rayapp.data import storage

    if not storage.is_uri(out_dir):
        out = Path(out_dir)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            Path(staging).rename(out)
        except OSError:  # another device: copy instead
            shutil.copytree(staging, out)
        return
    storage.delete_dir_contents(out_dir)
    storage.upload_dir(staging, out_dir)


def parquet_files(path: str | os.PathLike) -> list[str]:
    """The Parquet files of a shard directory (sorted) or the one file given: local paths or URIs.

    One listing for the whole project: `rayapp.data.storage.parquet_files`.
    """
    from rayapp.data.storage import parquet_files as list_parquet

    return list_parquet(path)


def iter_comparisons(path: str | os.PathLike, *, batch_size: int = 64, columns: list[str] | None = None
                     ) -> Iterator[dict]:
    """Yield each prompt record (a dict of the row's columns) of a Parquet dir or file (path or URI), without Ray.

    Reads one record batch at a time, so memory stays bounded by `batch_size` rows.
    """
    from rayapp.data.storage import open_parquet

    for file in parquet_files(path):
        parquet = open_parquet(file)
        wanted = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=batch_size, columns=wanted):
            yield from batch.to_pylist()


def count_rows(path: str | os.PathLike) -> int:
    """Number of prompt rows, from the Parquet footers only."""
    from rayapp.data.storage import open_parquet

    return sum(open_parquet(f).metadata.num_rows for f in parquet_files(path))
