"""ImageRewardDB as published on the Hugging Face hub (`THUDM/ImageRewardDB`) -> comparison shards.

Layout of `huggingface_hub.snapshot_download("THUDM/ImageRewardDB", repo_type="dataset")`, as the dataset card
and public readers of the release describe it:

    ROOT/metadata-{split}.parquet        one row per image (the same records as the JSON files)
    ROOT/images/{split}/{split}_{k}.zip  WebP images (`<uuid>.webp`) and `{split}_{k}.json`, a list of one
                                         record per image
    ROOT/images/{split}/{split}_{k}/     the same zip extracted (either form is read; the zip wins)

A record: `image_path` ("images/{split}/{split}_{k}/<uuid>.webp", relative to ROOT), `prompt_id`, `prompt`,
`classification`, `image_amount_in_total`, `rank` (1 = best, ties allowed), `overall_rating`,
`image_text_alignment_rating`, `fidelity_rating`. Splits: train, validation, test. Subsets 1k / 2k / 4k / 8k
are the first 4 / 8 / 16 / 32 train zips; validation and test are the same for every subset.

Zips are read in place (random access through the filesystem, local or URI; nothing is extracted to disk).
Records come from each zip's own JSON, or from `metadata-{split}.parquet` for a zip without one. Images are
grouped by `prompt_id` (the row's `id`) in order of first appearance; within a row, images keep their
source order. A group is bad when its image count differs from `image_amount_in_total`, an image is missing
or undecodable, the prompt is empty, or its records disagree (named by prompt id).
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rayapp.data import storage
from rayapp.data.conversion import Candidate, ConvertReport, check_image, write_converted
from rayapp.data.shards import (
    DEFAULT_ROWS_PER_SHARD,
    IMAGEREWARDDB_SCHEMA,
    RATING_COLUMNS,
    check_out_dir,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SUBSET_TRAIN_PARTS = {"1k": 4, "2k": 8, "4k": 16, "8k": 32}


@dataclass
class Part:
    """One `{split}_{k}` unit of images: a zip file or the folder extracted from it."""

    split: str
    number: int
    name: str  # "{split}_{k}" as spelled on disk
    kind: str  # "zip" | "dir"
    path: str  # inside the filesystem


def looks_like_hub_layout(root: str | os.PathLike) -> str | None:
    """Why `root` looks like the hub release (for `--format auto`), or None."""
    _, entries = storage.list_entries(root)
    names = {name: kind for name, kind, _ in entries}
    metadata = sorted(n for n in names if n.startswith("metadata-") and n.endswith(".parquet"))
    if metadata:
        return f"found {', '.join(metadata)}"
    if names.get("images") == "dir":
        _, sub = storage.list_entries(storage.join(root, "images"))
        splits = [name for name, kind, _ in sub if kind == "dir" and name in SPLITS]
        if splits:
            return f"found images/{splits[0]}/"
    return None


def find_parts(root: str | os.PathLike, split: str):
    """(filesystem, parts of `split` sorted by k) under ROOT/images/{split}/."""
    filesystem, entries = storage.list_entries(storage.join(root, "images", split))
    pattern = re.compile(rf"^({re.escape(split)}_(\d+))(\.zip)?$")
    by_number: dict[int, Part] = {}
    for name, kind, inner in entries:
        match = pattern.match(name)
        if not match or (kind == "file") != bool(match.group(3)):
            continue
        number = int(match.group(2))
        if number in by_number and by_number[number].kind == "zip":
            continue  # the published zip wins over a folder extracted from it
        by_number[number] = Part(split, number, match.group(1), "zip" if match.group(3) else "dir", inner)
    return filesystem, [by_number[n] for n in sorted(by_number)]


def select_parts(parts: list[Part], split: str, subset: str | None, root: str) -> list[Part]:
    """The parts a subset takes: the first 4/8/16/32 train zips (all parts of validation / test)."""
    if split != "train" or subset is None:
        return parts
    need = SUBSET_TRAIN_PARTS[subset]
    numbers = [p.number for p in parts]
    expected = list(range(numbers[0], numbers[0] + need)) if numbers else list(range(1, need + 1))
    missing = [n for n in expected if n not in numbers]
    if missing:
        shown = ", ".join(f"train_{n}.zip" for n in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise FileNotFoundError(f"subset {subset} takes the first {need} train zips, but {root}/images/train/ "
                                f"lacks {shown} ({len(parts)} found); download them or pick a smaller --subset")
    return [p for p in parts if p.number in expected]


class PartReader:
    """Reads one part's JSON records and images by file name; a zip is opened in place, never extracted."""

    def __init__(self, filesystem, part: Part):
        self.part = part
        self.filesystem = filesystem
        self._zip = None
        self._handle = None
        if part.kind == "zip":
            self._handle = filesystem.open_input_file(part.path)
            self._zip = zipfile.ZipFile(self._handle)
            names = [info.filename for info in self._zip.infolist() if not info.is_dir()]
        else:
            from pyarrow.fs import FileSelector, FileType

            infos = filesystem.get_file_info(FileSelector(part.path, recursive=True))
            names = [i.path for i in infos if i.type == FileType.File]
        self._members: dict[str, str] = {}
        for name in names:  # members may sit at the zip's root or under a "{split}_{k}/" folder
            self._members.setdefault(posixpath.basename(name), name)

    def _read(self, member: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(member)
        with self.filesystem.open_input_file(member) as handle:
            return handle.read()

    def json_records(self) -> list | None:
        """The part's own `{split}_{k}.json`, or None when it has none."""
        member = self._members.get(f"{self.part.name}.json")
        if member is None:
            return None
        records = json.loads(self._read(member).decode("utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{self.part.name}.json: expected a list of image records")  # noqa: TRY004
        return records

    def read_image(self, image_path: str) -> bytes | None:
        """The bytes of the image a record names (by its file name), or None when the part lacks it."""
        member = self._members.get(posixpath.basename(str(image_path).replace("\\", "/")))
        return None if member is None else self._read(member)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._handle.close()


def _metadata_by_part(root: str, split: str) -> dict[str, list[dict]] | None:
    """metadata-{split}.parquet rows grouped by the part folder their image_path names, or None if absent."""
    path = storage.join(root, f"metadata-{split}.parquet")
    if storage.file_type(path) != "file":
        return None
    parquet = storage.open_parquet(path)
    wanted = [c for c in ("image_path", "prompt_id", "prompt", "classification", "image_amount_in_total", "rank",
                          *RATING_COLUMNS) if c in parquet.schema_arrow.names]
    grouped: dict[str, list[dict]] = {}
    for batch in parquet.iter_batches(columns=wanted):
        for row in batch.to_pylist():
            folder = posixpath.basename(posixpath.dirname(str(row.get("image_path") or "").replace("\\", "/")))
            grouped.setdefault(folder, []).append(row)
    return grouped


def _as_int(value) -> int | None:
    """An integral value as int; None for missing / NaN; raises ValueError for anything else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def group_records(records: Iterable[tuple[dict, PartReader]]) -> tuple[OrderedDict, list[tuple[str, str]]]:
    """Records grouped by prompt_id in order of first appearance; records without one are listed as bad."""
    groups: OrderedDict[str, list[tuple[dict, PartReader]]] = OrderedDict()
    bad = []
    for position, (record, reader) in enumerate(records):
        if not isinstance(record, dict) or record.get("prompt_id") in (None, ""):
            bad.append((f"{reader.part.name} record {position} (no prompt_id)", "record without a prompt_id"))
            continue
        groups.setdefault(str(record["prompt_id"]), []).append((record, reader))
    return groups, bad


def group_candidate(prompt_id: str, items: list[tuple[dict, PartReader]], pool: ThreadPoolExecutor) -> Candidate:
    """One prompt's row (images read and fully decoded), or why it is bad."""
    first = items[0][0]
    prompt = first.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return Candidate(prompt_id, reason="empty or missing prompt")
    if any(record.get("prompt") != prompt for record, _ in items):
        return Candidate(prompt_id, reason="its records disagree on the prompt")
    totals = {record.get("image_amount_in_total") for record, _ in items}
    if len(totals) != 1:
        return Candidate(prompt_id,
                         reason=f"its records disagree on image_amount_in_total ({sorted(map(str, totals))})")
    try:
        total = _as_int(totals.pop())
        ranking = [_as_int(record.get("rank")) for record, _ in items]
        ratings = {name: [_as_int(record.get(name)) for record, _ in items] for name in RATING_COLUMNS}
    except ValueError as err:
        return Candidate(prompt_id, reason=f"a rank, rating or image_amount_in_total: {err}")
    if total != len(items):
        return Candidate(prompt_id, reason=f"{len(items)} images found but image_amount_in_total is {total}")
    if any(rank is None for rank in ranking):
        return Candidate(prompt_id, reason="an image has no rank")
    images, paths = [], []
    for record, reader in items:
        path = str(record.get("image_path") or "")
        data = reader.read_image(path) if path else None
        if data is None:
            return Candidate(prompt_id, reason=f"missing image {path or '(no image_path)'} in {reader.part.name}")
        images.append(data)
        paths.append(path)
    for reason in pool.map(check_image, images, paths):
        if reason is not None:
            return Candidate(prompt_id, reason=reason)
    row = {"id": prompt_id, "prompt": prompt, "images": images, "ranking": ranking, **ratings,
           "classification": [None if r.get("classification") is None else str(r["classification"])
                              for r, _ in items]}
    return Candidate(prompt_id, row=row)


def resolve_splits(root: str, splits: Iterable[str] | None) -> list[str]:
    """The splits to convert: those asked for (checked), or every split present for None / "all"."""
    asked = [s for s in (splits or ["all"])]
    if "all" in asked:
        present = [s for s in SPLITS if find_parts(root, s)[1]]
        if not present:
            raise FileNotFoundError(f"no images/<split>/<split>_<k>.zip (or extracted folder) under {root}; "
                                    f"expected the layout of THUDM/ImageRewardDB")
        return present
    unknown = [s for s in asked if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)} or all")
    return list(dict.fromkeys(asked))


def _split_candidates(root: str, split: str, parts: list[Part], filesystem) -> Iterator[Candidate]:
    """Candidates of one split; readers stay open while the rows stream out."""
    metadata = None
    readers = [PartReader(filesystem, part) for part in parts]
    try:
        records: list[tuple[dict, PartReader]] = []
        for reader in readers:
            own = reader.json_records()
            if own is None:
                if metadata is None:
                    metadata = _metadata_by_part(root, split) or {}
                own = metadata.get(reader.part.name)
                if own is None:
                    raise FileNotFoundError(f"{reader.part.path} has no {reader.part.name}.json and "
                                            f"metadata-{split}.parquet lists none of its images")
            records.extend((record, reader) for record in own)
        groups, bad = group_records(records)
        for label, reason in bad:
            yield Candidate(label, reason=reason)
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            for prompt_id, items in groups.items():
                yield group_candidate(prompt_id, items, pool)
    finally:
        for reader in readers:
            reader.close()


def convert_hub(root: str | os.PathLike, out_dir: str | os.PathLike, *, splits: Iterable[str] | None = None,
                subset: str | None = None, skip_bad: bool = False, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                overwrite: bool = False, progress: bool = True) -> list[ConvertReport]:
    """Convert the hub layout at `root` to `out_dir/{split}` shard dirs (paths or URIs), one report per split."""
    root = os.fspath(root)
    if subset is not None and subset not in SUBSET_TRAIN_PARTS:
        raise ValueError(f"unknown subset {subset!r}; choose from {', '.join(SUBSET_TRAIN_PARTS)}")
    if storage.file_type(root) != "dir":
        raise FileNotFoundError(f"no ImageRewardDB folder at {root}")
    chosen = resolve_splits(root, splits)
    plans = []
    for split in chosen:
        filesystem, parts = find_parts(root, split)
        if not parts:
            raise FileNotFoundError(f"no {split}_<k>.zip (or extracted {split}_<k>/ folder) under "
                                    f"{storage.join(root, 'images', split)}")
        parts = select_parts(parts, split, subset, root)
        target = storage.join(out_dir, split)
        check_out_dir(target, overwrite=overwrite)  # every split checked before any is written
        plans.append((split, filesystem, parts, target))
    reports = []
    for split, filesystem, parts, target in plans:
        logger.info("ImageRewardDB %s: reading %d part(s) of %s", split, len(parts), root)
        report = write_converted(_split_candidates(root, split, parts, filesystem), target,
                                 fmt="imagerewarddb", schema=IMAGEREWARDDB_SCHEMA, skip_bad=skip_bad,
                                 rows_per_shard=rows_per_shard, overwrite=overwrite, progress=progress,
                                 desc=f"convert {split}")
        report.note = f"{split}: {len(parts)} {'zip' if parts[0].kind == 'zip' else 'folder'}(s)"
        reports.append(report)
    return reports
