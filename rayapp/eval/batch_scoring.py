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

Input and output may be local paths or URIs (s3://, gs://, ...; `rayapp.data.storage`): the planner lists
and reads footers through the filesystem, and the filesystem object (with the driver's credentials) travels
to the actors and writers. Image cells may be bytes or Hugging Face Datasets `{"bytes", "path"}` dicts (a
dict without bytes is read from its path, relative to the input's directory).

Execution: `ray.data.from_items(units)` -> one `map_batches(ScoreActor)` stage over an actor pool
(`concurrency` actors, `num_cpus` / `num_gpus` each); each actor loads every requested scorer once, reads its
unit's rows itself, decodes each image once and runs each scorer in batches of `batch_size`.

Writing: `write_datasink(ScoredPartsDatasink)`, Ray Data's writer path: the workers write their own parts,
one `part-<run>-<task>.parquet` per write task, never the driver. On a local disk a part is written to a
hidden temporary name and renamed when complete; on an object store an object only appears once its upload
completes. So a crash loses at most the parts in flight and never leaves a half-written one, and `resume`
reads the keys of the complete parts. Every output row = the input row + `score_<label>` (float64; NaN when
the image could not be decoded) + `score_error` (null, or the reason).
"""
from __future__ import annotations

import csv
import json
import math
import os
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

ROW_KEY = "_row_key"
ERROR_COLUMN = "score_error"


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
def detect_format(config: ScoreJobConfig) -> str:
    """"images", "comparison" or "folder" for the input (path or URI)."""
    if config.input_format != "auto":
        if config.input_format not in ("images", "comparison", "folder"):
            raise ValueError(f"unknown input format {config.input_format!r}")
        return config.input_format
    from rayapp.data import storage

    kind = storage.file_type(config.input)
    if kind == "missing":
        raise FileNotFoundError(f"no input at {config.input}")
    if kind == "dir" and not storage.list_files(config.input, missing_ok=True)[1]:
        return "folder"
    import pyarrow as pa

    schema = storage.open_parquet(storage.parquet_files(config.input)[0]).schema_arrow
    if "images" in schema.names and "ranking" in schema.names and pa.types.is_list(schema.field("images").type):
        return "comparison"
    return "images"


def read_prompts_file(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL or CSV prompts file (each needs `prompt` and `path`), local or URI."""
    import io

    from rayapp.data import storage

    text = storage.read_bytes(path).decode("utf-8")
    if os.fspath(path).lower().endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("prompt") or not row.get("path"):
            raise ValueError(f"{os.fspath(path)}:{number}: each line needs non-empty 'prompt' and 'path'")
    return rows


def _folder_prompts_file(config: ScoreJobConfig) -> str:
    from rayapp.data import storage

    if config.prompts_file:
        return config.prompts_file
    for name in ("prompts.jsonl", "prompts.csv"):
        candidate = storage.join(config.input, name)
        if storage.file_type(candidate) == "file":
            return candidate
    raise FileNotFoundError(f"folder input {config.input} needs --prompts-file (or prompts.jsonl / prompts.csv in it)")


def plan_units(config: ScoreJobConfig, fmt: str, done: set[str]) -> tuple[list[dict], int, int]:
    """Read units of at most `rows_per_block` rows not yet done; returns (units, rows_todo, rows_skipped)."""
    from rayapp.data import storage

    units: list[dict] = []
    todo = skipped = 0
    step = max(1, config.rows_per_block)
    if fmt == "folder":
        prompts_file = _folder_prompts_file(config)
        name = os.path.basename(prompts_file.rstrip("/"))
        rows = read_prompts_file(prompts_file)
        pending = []
        for number, row in enumerate(rows, start=1):
            key = str(row[config.key_column]) if config.key_column else f"{name}:{number}"
            if key in done:
                skipped += 1
                continue
            pending.append({**{k: (None if v is None else str(v)) for k, v in row.items()}, ROW_KEY: key})
        for start in range(0, len(pending), step):
            units.append({"kind": "rows", "file": "", "group": -1, "rows": json.dumps(pending[start:start + step]),
                          "keys": "[]"})
        return units, len(pending), skipped
    filesystem, files = storage.list_files(config.input)
    root = storage.resolve(config.input)[1]
    for file in files:
        rel = os.path.basename(file) if file == root else os.path.relpath(file, root)
        with storage.errors_named(config.input):
            parquet = pq_file(filesystem, file)
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
                units.append({"kind": "parquet", "file": file, "group": group,
                              "rows": json.dumps(chunk), "keys": json.dumps([keys[offset + i] for i in chunk])})
            offset += count
    return units, todo, skipped


def pq_file(filesystem, path: str):
    """`pyarrow.parquet.ParquetFile` of `path` inside `filesystem` (None: a local path)."""
    import pyarrow.parquet as pq

    if filesystem is None:
        return pq.ParquetFile(path)
    return pq.ParquetFile(filesystem.open_input_file(path))


def read_unit(unit: dict, filesystem=None) -> Any:
    """One planned unit -> a pyarrow Table of its input rows + `_row_key` (runs inside the actor)."""
    import pyarrow as pa

    if str(unit["kind"]) == "rows":
        return pa.Table.from_pylist(json.loads(str(unit["rows"])))
    rows = json.loads(str(unit["rows"]))
    table = pq_file(filesystem, str(unit["file"])).read_row_group(int(unit["group"]))
    table = table.take(pa.array(rows, type=pa.int64()))
    return table.append_column(ROW_KEY, pa.array(json.loads(str(unit["keys"])), type=pa.string()))


# ------------------------------------------------------------------------------------------ scoring
def _readable(item: Any, index: int, folder: str | None, folder_inner: str | None, filesystem) -> Any:
    """An image cell as `load_image` takes it. A relative path, or an image dict without bytes, points into
    `folder` (a local dir: the joined path is returned and `load_image` reads it; a URI: the bytes are read
    here at `folder_inner` through `filesystem`, the driver's, which carries its credentials). Everything
    else passes through."""
    from rayapp.data import storage
    from rayapp.model.images import ImageInputError, is_hf_image

    path = item.get("path") if is_hf_image(item) and item.get("bytes") is None else item
    if not isinstance(path, str) or not path or folder is None or os.path.isabs(path) or storage.is_uri(path):
        return item
    if not storage.is_uri(folder):
        return os.path.join(folder, path)
    if filesystem is None or folder_inner is None:
        filesystem, folder_inner = storage.resolve(folder)
    try:
        with filesystem.open_input_file(posixpath.join(folder_inner, path)) as handle:
            return handle.read()
    except FileNotFoundError as err:
        raise ImageInputError(f"image[{index}] ({storage.join(folder, path)!r}): no such file") from err


def decode_all(images: list, folder: str | None = None, filesystem=None, folder_inner: str | None = None
               ) -> tuple[list, list[str | None]]:
    """Decode every image input once (PIL); undecodable ones become None with the reason."""
    from rayapp.model.images import ImageInputError, load_image

    decoded, errors = [], []
    for index, item in enumerate(images):
        try:
            decoded.append(load_image(_readable(item, index, folder, folder_inner, filesystem), index))
            errors.append(None)
        except ImageInputError as err:
            decoded.append(None)
            errors.append(str(err))
    return decoded, errors


class ScoreActor:
    """Ray Data actor: loads every scorer once; per call reads one planned unit, decodes each image once,
    and adds one `score_<label>` column per scorer plus `score_error`.

    `folder`: the image folder (folder input) or the input's directory (relative image paths of Parquet
    input), `folder_inner` its path inside `filesystem`, the driver's filesystem of the input (None: local
    paths).
    """

    def __init__(self, specs: list[str], fmt: str, image_column: str, prompt_column: str, folder: str | None,
                 batch_size: int, device: str | None, dtype: str | None, tokenizer: str | None,
                 filesystem=None, drop_columns: tuple[str, ...] = (), folder_inner: str | None = None):
        import torch

        from rayapp.eval.scorers import load_scorer, parse_spec

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.specs = [parse_spec(s) for s in specs]
        self.scorers = [load_scorer(s, device=device, dtype=dtype, tokenizer=tokenizer) for s in self.specs]
        self.fmt, self.image_column, self.prompt_column = fmt, image_column, prompt_column
        self.folder = None if folder is None else os.fspath(folder)
        self.batch_size = batch_size
        self.filesystem = filesystem
        self.folder_inner = folder_inner
        self.drop_columns = tuple(drop_columns)

    def __call__(self, batch: dict):
        import pyarrow as pa

        count = len(batch["kind"])
        tables = [self.score_table(read_unit({k: v[i] for k, v in batch.items()}, self.filesystem))
                  for i in range(count)]
        table = pa.concat_tables(tables) if count > 1 else tables[0]
        dropped = [c for c in self.drop_columns if c in table.column_names]
        return table.drop_columns(dropped) if dropped else table

    def score_table(self, table):
        import pyarrow as pa

        prompts = [str(p) for p in table[self.prompt_column].to_pylist()]
        if self.fmt == "comparison":
            lists = table["images"].to_pylist()
            lengths = [len(images) for images in lists]
            flat_images = [img for images in lists for img in images]
        else:
            lengths = [1] * table.num_rows
            column = "path" if self.fmt == "folder" else self.image_column
            flat_images = table[column].to_pylist()
        flat_prompts = [p for p, n in zip(prompts, lengths) for _ in range(n)]
        decoded, errors = decode_all(flat_images, self.folder, self.filesystem, self.folder_inner)
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
def _part_name(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def output_parts(output: str | os.PathLike) -> list[str]:
    """The complete part files of an output dir (local paths or URIs), sorted."""
    from rayapp.data import storage

    filesystem, entries = storage.list_entries(output)
    return [storage.display(filesystem, inner, output) for name, kind, inner in entries
            if kind == "file" and _part_name(name)]


def existing_keys(output: str | os.PathLike) -> set[str]:
    """Row keys already written (complete part files only; leftover temporary files are removed)."""
    from rayapp.data import storage

    keys: set[str] = set()
    filesystem, entries = storage.list_entries(output)
    for name, kind, inner in entries:
        if kind == "file" and name.startswith(".tmp-"):
            filesystem.delete_file(inner)
    for part in output_parts(output):
        keys.update(storage.open_parquet(part).read(columns=[ROW_KEY])[ROW_KEY].to_pylist())
    return keys


def read_scored(output: str | os.PathLike, columns: list[str] | None = None):
    """All part files of an output directory (path or URI) as one pyarrow Table."""
    import pyarrow as pa

    from rayapp.data import storage

    parts = output_parts(output)
    if not parts:
        raise FileNotFoundError(f"no part-*.parquet files in {os.fspath(output)}")
    return pa.concat_tables([storage.open_parquet(p).read(columns=columns) for p in parts],
                            promote_options="default")


def _prepare_output(config: ScoreJobConfig) -> None:
    from rayapp.data import storage

    storage.ensure_writable_dir(config.output)  # a missing bucket / bad credentials fail here, naming the URI
    parts = output_parts(config.output)
    if parts and not config.resume:
        if not config.overwrite:
            raise FileExistsError(f"{config.output} already holds part files; pass --resume to continue or --overwrite")
        for part in parts:
            storage.delete_file(part)


def make_datasink(output: str, run_id: str, fmt: str, count_column: str):
    """A `ray.data.Datasink` whose write tasks each write their blocks as one `part-<run_id>-<task>.parquet`
    under `output` (path or URI) and return its counts; built here so that importing this module needs no Ray."""
    from ray.data import Datasink

    from rayapp.data import storage

    filesystem, directory = storage.resolve(output)
    local = not storage.is_uri(output)

    class ScoredPartsDatasink(Datasink):
        def __init__(self):
            self.stats: list[dict] = []

        def write(self, blocks, ctx) -> dict:
            import pyarrow as pa
            import pyarrow.parquet as pq
            from ray.data.block import BlockAccessor

            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"rows": 0, "images": 0, "errors": 0, "file": None, "written_at": time.time()}
            table = pa.concat_tables(tables, promote_options="default")
            name = f"part-{run_id}-{ctx.task_idx:06d}.parquet"
            final = f"{directory.rstrip('/')}/{name}"
            # local disks: write aside, then rename, so a killed writer never leaves a readable half part;
            # object stores publish an object only when its upload completes
            target = f"{directory.rstrip('/')}/.tmp-{name}" if local else final
            pq.write_table(table, target, filesystem=filesystem)
            if local:
                filesystem.move(target, final)
            if fmt == "comparison":
                import pyarrow.compute as pc

                images = int(pc.sum(pc.list_value_length(table[count_column])).as_py() or 0)
            else:
                images = table.num_rows
            return {"rows": table.num_rows, "images": images, "errors": table.num_rows - table[ERROR_COLUMN].null_count,
                    "file": storage.display(filesystem, final, output), "written_at": time.time()}

        def on_write_complete(self, write_result) -> None:
            self.stats = [r for r in write_result.write_returns if r and r["file"]]

    return ScoredPartsDatasink()


# ---------------------------------------------------------------------------------------------- job
def run_score_job(config: ScoreJobConfig) -> ScoreJobResult:
    """Plan, score and write; connects to Ray (RAY_ADDRESS / an existing connection / a local instance)."""
    import ray

    from rayapp.data import storage
    from rayapp.eval.scorers import parse_spec

    specs = [parse_spec(s) for s in config.scorers]
    if len({s.column for s in specs}) != len(specs):
        raise ValueError(f"two scorers share a column name: {[s.column for s in specs]}; label them LABEL=SPEC")
    fmt = detect_format(config)
    _prepare_output(config)
    done = existing_keys(config.output) if config.resume else set()
    units, _todo, skipped = plan_units(config, fmt, done)
    started = time.perf_counter()
    wall_start = time.time()
    result = ScoreJobResult(os.fspath(config.output), 0, 0, skipped, 0, 0.0, [])
    if not units:
        print(f"nothing to score: {skipped} rows already in {config.output}")
        return result
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    input_filesystem = storage.resolve(config.input)[0]
    if fmt == "folder":
        base = config.input
    else:
        kind = storage.file_type(config.input)
        base = config.input if kind == "dir" else (
            config.input.rsplit("/", 1)[0] if storage.is_uri(config.input) else os.path.dirname(
                os.path.abspath(config.input)))
    drop = tuple(c for c in (config.image_column, "images") if config.drop_images)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs={"specs": [s.to_string() for s in specs], "fmt": fmt,
                               "image_column": config.image_column, "prompt_column": config.prompt_column,
                               "folder": base, "batch_size": config.batch_size, "device": config.device,
                               "dtype": config.dtype, "tokenizer": config.tokenizer, "filesystem": input_filesystem,
                               "drop_columns": drop, "folder_inner": storage.resolve(base)[1]},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.num_cpus, num_gpus=config.num_gpus or None,
    )
    run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    sink = make_datasink(config.output, run_id, fmt, specs[0].column)
    context = ray.data.DataContext.get_current()
    shown = context.enable_progress_bars
    context.enable_progress_bars = config.progress
    try:
        with storage.errors_named(config.output):
            ds.write_datasink(sink)
    finally:
        context.enable_progress_bars = shown
    for stat in sorted(sink.stats, key=lambda s: s["written_at"]):
        result.files.append(stat["file"])
        result.rows_written += stat["rows"]
        result.images_scored += stat["images"]
        result.errors += stat["errors"]
    if sink.stats:
        result.first_block_s = min(s["written_at"] for s in sink.stats) - wall_start
    result.seconds = time.perf_counter() - started
    return result
