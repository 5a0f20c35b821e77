"""Parquet comparison shards (format b): the schema, a streaming shard writer and a streaming reader.

One row per prompt: `id`, `prompt`, `images` (encoded PNG/JPEG bytes), `ranking` (lower = better,
ties allowed); the synthetic set adds per-image `faithfulness` and `quality` (its ranking rule's inputs).
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
COMPARISON_SCHEMA = pa.schema(COMPARISON_FIELDS)
SYNTH_SCHEMA = pa.schema(COMPARISON_FIELDS + SYNTH_FIELDS)
DEFAULT_ROWS_PER_SHARD = 256


class ShardWriter:
    """Writes rows to `out_dir/part-NNNNN.parquet`, `rows_per_shard` rows per file, holding one shard at most."""

    def __init__(self, out_dir: str | os.PathLike, schema: pa.Schema = COMPARISON_SCHEMA,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.rows_written = 0
        self.paths: list[Path] = []
        self._pending: list[dict] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        columns = {f.name: [row[f.name] for row in self._pending] for f in self.schema}
        table = pa.Table.from_pydict(columns, schema=self.schema)
        path = self.out_dir / f"part-{len(self.paths):05d}.parquet"
        pq.write_table(table, path)
        self.paths.append(path)
        self.rows_written += len(self._pending)
        self._pending = []

    def close(self) -> list[Path]:
        self.flush()
        return self.paths

    def __enter__(self) -> ShardWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """An empty output directory; refuses to mix new shards with old ones unless `overwrite`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; pass overwrite / --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def parquet_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a shard directory (sorted) or the one file given."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no Parquet file or directory at {path}")
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.parquet files under {path}")
    return files


def iter_comparisons(path: str | os.PathLike, *, batch_size: int = 64) -> Iterator[dict]:
    """Yield each prompt record (a dict of the row's columns) of a Parquet dir or file, without Ray.

    Reads one record batch at a time, so memory stays bounded by `batch_size` rows.
    """
    for file in parquet_files(path):
        parquet = pq.ParquetFile(file)
        for batch in parquet.iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()


def count_rows(path: str | os.PathLike) -> int:
    """Number of prompt rows, from the Parquet footers only."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(path))
