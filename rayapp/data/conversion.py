"""The shard-writer core every converter shares: candidate records in, checked and published shards out.

A converter (`formats` for JSON, `imagerewarddb`, `pair_tables`) turns its source into `Candidate`s, each a
row or the reason it is bad; `write_converted` streams them into shards in a local staging directory and
publishes them at the end (renamed into place locally, uploaded for a URI), all or nothing unless `skip_bad`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rayapp.data import storage
from rayapp.data.pairs import count_pairs
from rayapp.data.shards import (
    COMPARISON_SCHEMA,
    DEFAULT_ROWS_PER_SHARD,
    ShardWriter,
    check_out_dir,
    publish_dir,
)

DEFAULT_BYTES_PER_SHARD = 256 * 2**20  # image bytes per Parquet file before it is closed


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
    format: str = "json"
    rows: int = 0
    images: int = 0
    pairs: int = 0
    shards: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (record id, reason) of skipped records
    note: str = ""  # e.g. how "auto" decided


@dataclass
class Candidate:
    """One record on its way to a shard: its row, or why it is bad."""

    label: str
    row: dict | None = None
    reason: str | None = None


def check_image(data, label: str) -> str | None:
    """Why these encoded bytes are not a usable image (fully decoded), or None."""
    from rayapp.model.images import ImageInputError, load_image

    if data is None or len(data) == 0:
        return f"{label}: missing image (no bytes)"
    try:
        load_image(bytes(data))
    except ImageInputError as err:
        cause = type(err.__cause__).__name__ if err.__cause__ is not None else "ImageInputError"
        return f"{label}: cannot decode image ({cause})"
    return None


def write_converted(candidates: Iterable[Candidate], out_dir: str | os.PathLike, *, fmt: str,
                    schema=COMPARISON_SCHEMA, skip_bad: bool = False,
                    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, bytes_per_shard: int = DEFAULT_BYTES_PER_SHARD,
                    overwrite: bool = False, progress: bool = True, total: int | None = None,
                    desc: str = "convert") -> ConvertReport:
    """Stream candidates into shards at `out_dir` (local or URI); all-or-nothing unless `skip_bad`.

    Rows need `id`, `prompt`, `images` (bytes), `ranking` and the schema's other columns; a repeated id is bad.
    """
    from tqdm import tqdm

    out = os.fspath(out_dir)
    check_out_dir(out, overwrite=overwrite)
    if storage.is_uri(out):
        staging = Path(tempfile.mkdtemp(prefix="rayapp-convert-"))
    else:
        # a sibling dir, so that publishing is a rename on the same filesystem
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.partial-", dir=Path(out).parent))
    report = ConvertReport(out_dir=out, format=fmt)
    seen: set[str] = set()
    count = 0
    try:
        with ShardWriter(staging, schema=schema, rows_per_shard=rows_per_shard,
                         bytes_per_shard=bytes_per_shard) as writer:
            for candidate in tqdm(candidates, desc=desc, unit="prompt", total=total, disable=not progress):
                count += 1
                reason = candidate.reason
                if reason is None and candidate.row["id"] in seen:
                    reason = "duplicate id"
                if reason is not None:
                    report.bad.append((candidate.label, reason))
                    continue
                row = candidate.row
                seen.add(row["id"])
                writer.write(row)
                report.rows += 1
                report.images += len(row["images"])
                report.pairs += count_pairs(row["ranking"])
        if report.bad and not skip_bad:
            raise BadRecordsError(report.bad, count)
        if report.rows == 0:
            raise ValueError(f"nothing to write to {out}: no usable records"
                             + (f" ({len(report.bad)} bad)" if report.bad else ""))
        publish_dir(staging, out)
        report.shards = [storage.join(out, p.name) for p in writer.paths]
        return report
    finally:
        if staging.exists():
            shutil.rmtree(staging)
