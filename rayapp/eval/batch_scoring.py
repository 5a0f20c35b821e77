"""Score image collections with Ray Data: an actor pool per scorer, incremental Parquet output, resume.

Inputs (`input_format`, "auto" detects):
- "images":     Parquet (file or directory) with one image per row: an image-bytes column (`image_column`,
                default "image") and a prompt column (`prompt_column`, default "prompt"); other columns pass
                through.
- "comparison": the comparison shards of rayapp.data (`id, prompt, images: list<binary>, ranking, ...`); each
                prompt row gets a `score_<label>: list<double>` column, one score per image.
- "folder":     a directory of images plus a prompts file (JSONL or CSV) with `prompt` and `path` (relative to
                the directory) per line; other fields pass through.

Row keys: every output row carries `_row_key`, unique and deterministic per input row:
`<file relative to the input>:<row number in that file>` (Parquet), `<prompts file>:<line number>`
(folder input), or the value of `key_column` when given (must be unique). `resume=True` reads the keys
already in the output and scores only the others.

Execution: `ray.data.from_items(units)` -> one `map_batches(ScoreActor)` stage over an actor pool
(`concurrency` actors, `num_cpus` / `num_gpus` each); each actor loads every requested scorer once, reads its
unit's rows itself, decodes each image once and runs each scorer in batches of `batch_size`.

Writing: the driver streams the scored blocks (`iter_batches(batch_size=None)`) and writes each block to its
own `part-<run>-<seq>.parquet` through a temporary file renamed on completion, so a crash loses at most the
blocks in flight and never leaves a half-written part. Every output row = the input row + `score_<label>`
(float64; NaN when the image could not be decoded) + `score_error` (null, or the reason).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROW_KEY = "_row_key"
ERROR_COLUMN = "score_error"
CRASH_AFTER_ENV = "RAYAPP_SCORE_CRASH_AFTER_BLOCKS"  # test hook: the driver dies (os._exit) after N blocks


@dataclass
class ScoreJobConfig:
    input: str
    output: str
    scorers: list[str] = field(default_factory=lambda: ["ImageReward"])
    input_format: str = "auto"  # auto | images | comparison | folder
    prompts_file: str | None = None  # folder input: JSONL/CSV of {prompt, path}; default <folder>/prompts.jsonl
    image_column: str = "image"
    prompt_column: str = "prompt"
    key_column: str | None = None
    batch_size: int = 16  # rows per model call inside an actor
    rows_per_block: int = 64  # input rows per read unit = per output part file (at most)
    concurrency: int = 1  # actors per scorer
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    device: str | None = None  # default: cuda when the actor has a GPU, else cpu
    dtype: str | None = None
    tokenizer: str | None = None
    resume: bool = False
    overwrite: bool = False
    drop_images: bool = False  # leave the image bytes out of the output
    progress: bool = True


@dataclass
class ScoreJobResult:
    output: str
    rows_written: int
    images_scored: int
    rows_skipped: int  # already present (resume)
    errors: int  # rows with a score_error
    seconds: float
    files: list[str]
    first_block_s: float = float("nan")  # start -> first block written (planning, actor start-up, model load)

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.images_scored / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (f"scored {self.rows_written} rows ({self.images_scored} images) in {self.seconds:.1f} s: "
                f"{self.rows_per_s:.2f} rows/s, {self.images_per_s:.2f} images/s "
                f"(first block written after {self.first_block_s:.1f} s); "
                f"{self.rows_skipped} rows already done, {self.errors} rows with errors -> {self.output}")

    def to_dict(self) -> dict:
        return {**asdict(self), "rows_per_s": self.rows_per_s, "images_per_s": self.images_per_s}


# ------------------------------------------------------------------------------------------ inputs
def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.parquet files under {path}")
    return files


def detect_format(config: ScoreJobConfig) -> str:
    if config.input_format != "auto":
        if config.input_format not in ("images", "comparison", "folder"):
            raise ValueError(f"unknown input format {config.input_format!r}")
        return config.input_format
    path = Path(config.input)
    if path.is_dir() and not any(path.rglob("*.parquet")):
        return "folder"
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(_parquet_files(path)[0])
    if "images" in schema.names and "ranking" in schema.names and pa.types.is_list(schema.field("images").type):
        return "comparison"
    return "images"


def read_prompts_file(path: Path) -> list[dict]:
    """Rows of a JSONL or CSV prompts file (each needs `prompt` and `path`)."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("prompt") or not row.get("path"):
            raise ValueError(f"{path}:{number}: each line needs non-empty 'prompt' and 'path'")
    return rows


def _folder_prompts_file(config: ScoreJobConfig) -> Path:
    if config.prompts_file:
        return Path(config.prompts_file)
    for name in ("prompts.jsonl", "prompts.csv"):
        candidate = Path(config.input) / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"folder input {config.input} needs --prompts-file (or prompts.jsonl / prompts.csv in it)")


def plan_units(config: ScoreJobConfig, fmt: str, done: set[str]) -> tuple[list[dict], int, int]:
    """Read units of at most `rows_per_block` rows not yet done; returns (units, rows_todo, rows_skipped)."""
    units: list[dict] = []
    todo = skipped = 0
    step = max(1, config.rows_per_block)
    if fmt == "folder":
        prompts_file = _folder_prompts_file(config)
        rows = read_prompts_file(prompts_file)
        pending = []
        for number, row in enumerate(rows, start=1):
            key = str(row[config.key_column]) if config.key_column else f"{prompts_file.name}:{number}"
            if key in done:
                skipped += 1
                continue
            pending.append({**{k: (None if v is None else str(v)) for k, v in row.items()}, ROW_KEY: key})
        for start in range(0, len(pending), step):
            units.append({"kind": "rows", "file": "", "group": -1, "rows": json.dumps(pending[start:start + step]),
                          "keys": "[]"})
        return units, len(pending), skipped
    import pyarrow.parquet as pq

    root = Path(config.input)
    for file in _parquet_files(root):
        rel = file.name if root.is_file() else os.fspath(file.relative_to(root))
        parquet = pq.ParquetFile(file)
        if config.key_column:
            keys = [str(k) for k in parquet.read(columns=[config.key_column])[config.key_column].to_pylist()]
        else:
            keys = [f"{rel}:{i}" for i in range(parquet.metadata.num_rows)]
        offset = 0
        for group in range(parquet.metadata.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            wanted = [i for i in range(count) if keys[offset + i] not in done]
            skipped += count - len(wanted)
            todo += len(wanted)
            for start in range(0, len(wanted), step):
                chunk = wanted[start:start + step]
                units.append({"kind": "parquet", "file": os.fspath(file), "group": group,
                              "rows": json.dumps(chunk), "keys": json.dumps([keys[offset + i] for i in chunk])})
            offset += count
    return units, todo, skipped


def read_unit(unit: dict) -> Any:
    """One planned unit -> a pyarrow Table of its input rows + `_row_key` (runs inside the actor)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if str(unit["kind"]) == "rows":
        return pa.Table.from_pylist(json.loads(str(unit["rows"])))
    rows = json.loads(str(unit["rows"]))
    table = pq.ParquetFile(str(unit["file"])).read_row_group(int(unit["group"]))
    table = table.take(pa.array(rows, type=pa.int64()))
    return table.append_column(ROW_KEY, pa.array(json.loads(str(unit["keys"])), type=pa.string()))


# ------------------------------------------------------------------------------------------ scoring
def decode_all(images: list) -> tuple[list, list[str | None]]:
    """Decode every image input once (PIL); undecodable ones become None with the reason."""
    from rayapp.model.images import ImageInputError, load_image

    decoded, errors = [], []
    for index, item in enumerate(images):
        try:
            decoded.append(load_image(item, index))
            errors.append(None)
        except ImageInputError as err:
            decoded.append(None)
            errors.append(str(err))
    return decoded, errors


class ScoreActor:
    """Ray Data actor: loads every scorer once; per call reads one planned unit, decodes each image once,
    and adds one `score_<label>` column per scorer plus `score_error`."""

    def __init__(self, specs: list[str], fmt: str, image_column: str, prompt_column: str, folder: str | None,
                 batch_size: int, device: str | None, dtype: str | None, tokenizer: str | None):
        import torch

        from rayapp.eval.scorers import load_scorer, parse_spec

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.specs = [parse_spec(s) for s in specs]
        self.scorers = [load_scorer(s, device=device, dtype=dtype, tokenizer=tokenizer) for s in self.specs]
        self.fmt, self.image_column, self.prompt_column = fmt, image_column, prompt_column
        self.folder = Path(folder) if folder else None
        self.batch_size = batch_size

    def __call__(self, batch: dict):
        import pyarrow as pa

        count = len(batch["kind"])
        tables = [self.score_table(read_unit({k: v[i] for k, v in batch.items()})) for i in range(count)]
        return pa.concat_tables(tables) if count > 1 else tables[0]

    def score_table(self, table):
        import pyarrow as pa

        prompts = [str(p) for p in table[self.prompt_column].to_pylist()]
        if self.fmt == "comparison":
            lists = table["images"].to_pylist()
            lengths = [len(images) for images in lists]
            flat_images = [img for images in lists for img in images]
        else:
            lengths = [1] * table.num_rows
            if self.fmt == "folder":
                flat_images = [os.fspath(self.folder / p) for p in table["path"].to_pylist()]
            else:
                flat_images = table[self.image_column].to_pylist()
        flat_prompts = [p for p, n in zip(prompts, lengths) for _ in range(n)]
        decoded, errors = decode_all(flat_images)
        good = [i for i, img in enumerate(decoded) if img is not None]
        row_errors, pos = [], 0
        for n in lengths:
            bad = [errors[pos + i] for i in range(n) if errors[pos + i]]
            row_errors.append("; ".join(bad) if bad else None)
            pos += n
        for spec, scorer in zip(self.specs, self.scorers):
            flat = [math.nan] * len(flat_images)
            if good:
                values = scorer.score_pairs([flat_prompts[i] for i in good], [decoded[i] for i in good],
                                            batch_size=self.batch_size)
                for i, value in zip(good, values):
                    flat[i] = value
            if self.fmt == "comparison":
                grouped, pos = [], 0
                for n in lengths:
                    grouped.append(flat[pos:pos + n])
                    pos += n
                column = pa.array(grouped, type=pa.list_(pa.float64()))
            else:
                column = pa.array(flat, type=pa.float64())
            table = table.append_column(spec.column, column)
        return table.append_column(ERROR_COLUMN, pa.array(row_errors, type=pa.string()))


# ------------------------------------------------------------------------------------------ output
def existing_keys(output: Path) -> set[str]:
    """Row keys already written (complete part files only; temporary files are removed)."""
    import pyarrow.parquet as pq

    keys: set[str] = set()
    if not output.is_dir():
        return keys
    for tmp in output.glob(".tmp-*"):
        tmp.unlink()
    for part in sorted(output.glob("part-*.parquet")):
        keys.update(pq.read_table(part, columns=[ROW_KEY])[ROW_KEY].to_pylist())
    return keys


def read_scored(output: str | os.PathLike, columns: list[str] | None = None):
    """All part files of an output directory as one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(Path(output).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no part-*.parquet files in {output}")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts], promote_options="default")


def _prepare_output(config: ScoreJobConfig) -> Path:
    output = Path(config.output)
    if output.exists() and any(output.glob("part-*.parquet")) and not config.resume:
        if not config.overwrite:
            raise FileExistsError(f"{output} already holds part files; pass --resume to continue or --overwrite")
        for part in output.glob("part-*.parquet"):
            part.unlink()
    output.mkdir(parents=True, exist_ok=True)
    return output


# ---------------------------------------------------------------------------------------------- job
def run_score_job(config: ScoreJobConfig) -> ScoreJobResult:
    """Plan, score and write; connects to Ray (RAY_ADDRESS / an existing connection / a local instance)."""
    import pyarrow.parquet as pq
    import ray

    from rayapp.eval.scorers import parse_spec

    specs = [parse_spec(s) for s in config.scorers]
    if len({s.column for s in specs}) != len(specs):
        raise ValueError(f"two scorers share a column name: {[s.column for s in specs]}; label them LABEL=SPEC")
    fmt = detect_format(config)
    output = _prepare_output(config)
    done = existing_keys(output) if config.resume else set()
    units, todo, skipped = plan_units(config, fmt, done)
    started = time.perf_counter()
    result = ScoreJobResult(os.fspath(output), 0, 0, skipped, 0, 0.0, [])
    if not units:
        print(f"nothing to score: {skipped} rows already in {output}")
        return result
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    folder = os.fspath(Path(config.input)) if fmt == "folder" else None
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs=dict(specs=[s.to_string() for s in specs], fmt=fmt, image_column=config.image_column,
                                   prompt_column=config.prompt_column, folder=folder, batch_size=config.batch_size,
                                   device=config.device, dtype=config.dtype, tokenizer=config.tokenizer),
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.num_cpus, num_gpus=config.num_gpus or None,
    )
    crash_after = int(os.environ.get(CRASH_AFTER_ENV, "0") or 0)
    run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    from tqdm.auto import tqdm

    bar = tqdm(total=todo, desc="rows scored", unit="row", disable=not config.progress)
    try:
        for seq, block in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)):
            if block.num_rows == 0:
                continue
            images = _count_images(block, fmt)
            if config.drop_images:
                block = block.drop_columns([c for c in (config.image_column, "images") if c in block.column_names])
            part = output / f"part-{run_id}-{seq:06d}.parquet"
            tmp = output / f".tmp-{part.name}"
            pq.write_table(block, tmp)
            os.replace(tmp, part)
            result.files.append(os.fspath(part))
            result.rows_written += block.num_rows
            result.images_scored += images
            result.errors += block.num_rows - block[ERROR_COLUMN].null_count
            bar.update(block.num_rows)
            if len(result.files) == 1:
                result.first_block_s = time.perf_counter() - started
            if crash_after and len(result.files) >= crash_after:
                bar.close()
                os._exit(17)  # simulated crash for the resume test: no cleanup, actors die with the driver
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    return result


def _count_images(block, fmt: str) -> int:
    if fmt == "comparison":
        import pyarrow.compute as pc

        return int(pc.sum(pc.list_value_length(block["images"])).as_py() or 0)
    return block.num_rows
