"""Ray Data pipeline: Parquet comparison shards -> (better, worse) pairs -> preprocessed training rows.

Shards are local paths or URIs, read through the filesystem of `rayapp.data.storage` (the filesystem object,
with the driver's credentials, travels to the tasks). The planner lists the row groups once; then
1. `decode_pair_chunks`, one task per row group: each image decoded and cropped once (`crop_uint8`, the
   scorer's own geometry), each prompt tokenised once (tokenizer cached per worker process), pairs made by
   index (`pair_indices`) -> uint8 crops, token ids, pair_kind;
2. optional seeded `random_shuffle` of the pair rows;
3. `normalize_pair_batch`: the whole block normalised at once (`normalize_uint8`, bit-identical to
   `preprocess_pil`).
An image is decoded once per pass, not once per pair it belongs to, and the shuffle moves uint8 crops (for
real photos smaller than their PNG / lossless WebP files). Tasks, not actors: a lazy dataset would start
its actors again on every pass (epoch, validation), seconds each on a small host, while tasks reuse Ray's
warm workers. `build_pair_rows` is the encoded-pairs view (image bytes, no decoding) for code that
preprocesses itself. Figures: benchmarks/data_pipeline.py, docs/DATA.md.

Output columns (DESIGN.md): pixels_better, pixels_worse float32 [3,S,S]; input_ids, attention_mask int64
[max_length]; pair_kind string ("caption" / "quality" / "both" for the synthetic set, "human" otherwise);
with `with_ids=True` also pair_id "ID:better>worse". In Ray 2.60 `iter_torch_batches` fails on the string
columns (and a `dtypes` dict must name every column): iterate with `torch_batches(shard_or_dataset, ...)`,
which goes through numpy batches and keeps pair_kind / pair_id as lists of str.

Resources: every data operator asks for `cpus_per_task` (default 0.25) logical CPUs, so the pipeline keeps
running next to train workers that hold whole CPUs (Ray Data waits forever for a CPU the train workers hold).
Nothing here collects the dataset into one process: blocks stream through the object store.
"""
from __future__ import annotations

import os

import numpy as np

from rayapp.data.pairs import pair_indices, pair_kind

DEFAULT_CPUS_PER_TASK = 0.25
DEFAULT_BATCH_SIZE = 32  # what consumers iterate with; preprocessing runs on larger blocks
DEFAULT_ROWS_PER_BLOCK = 256  # pairs per block entering preprocessing
DEFAULT_CONCURRENCY = 2  # preprocessing tasks at once
OUTPUT_COLUMNS = ("pixels_better", "pixels_worse", "input_ids", "attention_mask", "pair_kind")
REQUIRED_COLUMNS = ("id", "prompt", "images", "ranking")
LABEL_COLUMNS = ("faithfulness", "quality")


def _input(path: str | os.PathLike) -> tuple:
    """(filesystem, Parquet files inside it, columns to read) of a shard dir (path or URI)."""
    from rayapp.data import storage

    filesystem, files = storage.list_files(path)
    with storage.errors_named(path):
        import pyarrow.parquet as pq

        names = set(pq.ParquetFile(filesystem.open_input_file(files[0])).schema_arrow.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{storage.display(filesystem, files[0], path)}: not a comparison shard, "
                         f"missing columns {missing}")
    return filesystem, files, list(REQUIRED_COLUMNS) + [c for c in LABEL_COLUMNS if c in names]


def _pair_index(table) -> dict:
    """Where every unequal-rank pair of a block of prompt rows points: its row, the flat indices of its two
    images in `images` flattened, its id and kind."""
    ids = table["id"].to_pylist()
    rankings = table["ranking"].to_pylist()
    labels = {c: table[c].to_pylist() for c in LABEL_COLUMNS if c in table.column_names}
    images = table["images"].combine_chunks()
    # list_flatten starts at the first row's offset, which a sliced block need not have at 0
    offsets = images.offsets.to_numpy().astype(np.int64)
    offsets = offsets[:-1] - offsets[0]
    rows, better, worse, pair_ids, kinds = [], [], [], [], []
    for r, ranking in enumerate(rankings):
        record = {c: values[r] for c, values in labels.items()}
        for b, w in pair_indices(ranking):
            rows.append(r)
            better.append(offsets[r] + b)
            worse.append(offsets[r] + w)
            pair_ids.append(f"{ids[r]}:{b}>{w}")
            kinds.append(pair_kind(record, b, w))
    return {"rows": np.asarray(rows, dtype=np.int64), "better": np.asarray(better, dtype=np.int64),
            "worse": np.asarray(worse, dtype=np.int64), "pair_ids": pair_ids, "kinds": kinds, "images": images}


def expand_pair_block(table):
    """Ray map_batches fn (pyarrow in and out): one row per unequal-rank pair of every prompt in the block:
    pair_id, prompt, image_better, image_worse (encoded bytes), pair_kind."""
    import pyarrow as pa
    import pyarrow.compute as pc

    index = _pair_index(table)
    flat = pc.list_flatten(index["images"])
    return pa.table({
        "pair_id": pa.array(index["pair_ids"], type=pa.string()),
        "prompt": table["prompt"].take(pa.array(index["rows"], type=pa.int64())),
        "image_better": flat.take(pa.array(index["better"], type=pa.int64())),
        "image_worse": flat.take(pa.array(index["worse"], type=pa.int64())),
        "pair_kind": pa.array(index["kinds"], type=pa.string()),
    })


def read_units(filesystem, files: list[str]) -> list[dict]:
    """One read unit per Parquet row group ({"file", "group"}), from the footers: more units than files lets
    several tasks decode one large shard."""
    import pyarrow.parquet as pq

    units = []
    for file in files:
        groups = pq.ParquetFile(filesystem.open_input_file(file)).metadata.num_row_groups
        units.extend({"file": file, "group": group} for group in range(groups))
    return units


def _read_units(batch: dict, filesystem, columns: list[str]):
    """The rows of the units in a batch (`file`, `group`) as one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.ParquetFile(filesystem.open_input_file(str(f))).read_row_group(int(g), columns=columns)
              for f, g in zip(batch["file"], batch["group"])]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_pair_units(batch: dict, *, filesystem, columns: list[str]):
    """Ray map_batches fn: read the row groups named in the batch and expand them to encoded pairs."""
    return expand_pair_block(_read_units(batch, filesystem, columns))


def _record_chunks(table, pairs_per_chunk: int):
    """Consecutive row ranges of a prompt table holding about `pairs_per_chunk` pairs each."""
    start, count = 0, 0
    for r, ranking in enumerate(table["ranking"].to_pylist()):
        count += len(pair_indices(ranking))
        if count >= pairs_per_chunk:
            yield start, r + 1
            start, count = r + 1, 0
    if start < table.num_rows:
        yield start, table.num_rows


def decode_pair_chunks(batch: dict, *, filesystem, columns: list[str], image_size: int, tokenizer_dir: str,
                       max_length: int, pairs_per_chunk: int, tokenizer_via=None):
    """Ray map_batches fn (generator): read the row groups named in the batch, decode and crop every image once
    (`crop_uint8`) and tokenise every prompt once, then yield the pairs in chunks of ~`pairs_per_chunk` rows:
    pair_id, crop_better / crop_worse (uint8 [S,S,3]), input_ids, attention_mask, pair_kind.

    Decoding before the shuffle decodes an image once per pass instead of once per pair it is in (K-1 times
    for K images of a prompt); the shuffle then moves uint8 crops, which for real photos (large PNG / lossless
    WebP) are smaller than the encoded files."""
    import pyarrow.compute as pc

    from rayapp.model.images import ImageInputError, crop_uint8, load_image

    table = _read_units(batch, filesystem, columns)
    tokenizer = _tokenizer(tokenizer_dir, tokenizer_via)
    for start, stop in _record_chunks(table, pairs_per_chunk):
        chunk = table.slice(start, stop - start)
        index = _pair_index(chunk)
        if not len(index["rows"]):
            continue
        flat = pc.list_flatten(index["images"]).to_pylist()
        owners = np.repeat(np.arange(chunk.num_rows), np.diff(index["images"].offsets.to_numpy()))
        ids = chunk["id"].to_pylist()
        crops = []
        for k, data in enumerate(flat):
            try:
                crops.append(crop_uint8(load_image(data, k), image_size))
            except ImageInputError as err:
                raise ImageInputError(f"prompt {ids[owners[k]]}: {err}") from err
        crops = np.stack(crops)
        enc = tokenizer([str(p) for p in chunk["prompt"].to_pylist()], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="np")
        rows = index["rows"]
        yield {
            "pair_id": np.asarray(index["pair_ids"], dtype=object),
            "crop_better": crops[index["better"]],
            "crop_worse": crops[index["worse"]],
            "input_ids": enc["input_ids"].astype(np.int64)[rows],
            "attention_mask": enc["attention_mask"].astype(np.int64)[rows],
            "pair_kind": np.asarray(index["kinds"], dtype=object),
        }


def normalize_pair_batch(batch: dict, *, with_ids: bool = False) -> dict:
    """Ray map_batches fn: uint8 crops -> CLIP-normalised float32 [3,S,S] (`normalize_uint8`, the whole batch
    at once); the token columns and pair_kind pass through."""
    from rayapp.model.images import normalize_uint8

    out = {
        "pixels_better": normalize_uint8(np.asarray(batch["crop_better"])),
        "pixels_worse": normalize_uint8(np.asarray(batch["crop_worse"])),
        "input_ids": np.asarray(batch["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(batch["attention_mask"], dtype=np.int64),
        "pair_kind": np.asarray([str(k) for k in batch["pair_kind"]], dtype=object),
    }
    if with_ids:
        out["pair_id"] = np.asarray([str(p) for p in batch["pair_id"]], dtype=object)
    return out


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(tokenizer_dir: str, via=None):
    """The tokenizer of `tokenizer_dir`, loaded once per worker process (Ray reuses its workers). A URI is
    copied to this node's local cache first, through `via` = (the driver's filesystem, path inside it)."""
    if tokenizer_dir not in _TOKENIZERS:
        from rayapp.data.storage import local_dir
        from rayapp.model.tokenizer import load_tokenizer

        _TOKENIZERS[tokenizer_dir] = load_tokenizer(local_dir(tokenizer_dir, via=via))
    return _TOKENIZERS[tokenizer_dir]


TENSOR_COLUMNS = ("pixels_better", "pixels_worse", "input_ids", "attention_mask")


def torch_batches(data, batch_size: int, *, local_shuffle_buffer_size: int | None = None,
                  local_shuffle_seed: int | None = None, drop_last: bool = False):
    """Yield dicts of torch tensors (the numeric columns) plus str lists (pair_kind, pair_id) from a
    `ray.data.Dataset` or a `ray.train.get_dataset_shard(...)` iterator."""
    import torch

    for batch in data.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                   local_shuffle_buffer_size=local_shuffle_buffer_size,
                                   local_shuffle_seed=local_shuffle_seed):
        yield {
            name: (torch.from_numpy(_writable(value)) if name in TENSOR_COLUMNS else [str(v) for v in value])
            for name, value in batch.items()
        }


def _writable(array: np.ndarray) -> np.ndarray:
    """A contiguous array torch may own: batches viewing Arrow buffers are read-only (copied then)."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def build_pair_rows(path: str | os.PathLike, *, shuffle_seed: int | None = None,
                    cpus_per_task: float = DEFAULT_CPUS_PER_TASK, rows_per_block: int = DEFAULT_ROWS_PER_BLOCK):
    """A lazy dataset of still-encoded pairs: pair_id, prompt, image_better, image_worse (bytes), pair_kind.

    The first half of the pipeline, also useful for batch scoring / evaluation that preprocesses itself.
    `path` is a shard dir or file, local or a URI (the filesystem object, with its credentials, travels
    to the read tasks).
    """
    import ray

    filesystem, files, columns = _input(path)
    units = read_units(filesystem, files)
    # units listed here: read_parquet would spend a task per pass listing the files
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(read_pair_units, fn_kwargs={"filesystem": filesystem, "columns": columns},
                        batch_format="pyarrow", batch_size=1, num_cpus=cpus_per_task)
    if shuffle_seed is not None:
        ds = ds.random_shuffle(seed=shuffle_seed, num_cpus=cpus_per_task)
    # one Parquet file becomes one block of ~K^2/2 pairs per prompt; bounded blocks let several preprocessing
    # tasks and both train shards work at once
    ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    # read tasks finish in any order; without this the shuffle's input order, and so its output, varies
    ds.context.execution_options.preserve_order = True
    return ds


def build_pair_dataset(path: str | os.PathLike, *, image_size: int, tokenizer_dir: str | os.PathLike,
                       max_length: int, shuffle_seed: int | None = None, with_ids: bool = False,
                       batch_size: int = DEFAULT_BATCH_SIZE, cpus_per_task: float = DEFAULT_CPUS_PER_TASK,
                       concurrency: int | None = None, preprocess_actors: int | tuple[int, int] | None = None,
                       rows_per_block: int = DEFAULT_ROWS_PER_BLOCK, preserve_order: bool = True):
    """A lazy `ray.data.Dataset` of preprocessed (better, worse) pairs from a Parquet shard dir (path or URI).

    `shuffle_seed` set: a seeded full shuffle of the pairs (same order every epoch; add a per-epoch
    `local_shuffle_seed` when iterating for variety). None: file order. `preserve_order` keeps that order
    through the parallel preprocessing tasks, so a seed fixes the output order when iterating this
    dataset directly; Ray Train replaces the execution options with its DataConfig's (see
    `train_data_config`), and `streaming_split` hands blocks to whichever worker asks first.
    Stages: one task per Parquet row group reads, decodes and crops each image once and tokenises each
    prompt once (`decode_pair_chunks`, uint8 crops out) -> seeded shuffle -> `normalize_pair_batch`.
    `concurrency`: tasks of each of those stages at once (default 2). `preprocess_actors` (older name, int
    or (min, max)) is read as the same bound. Blocks hold `max(batch_size, rows_per_block)` pairs;
    `batch_size` is what consumers are expected to iterate with. `tokenizer_dir` may be a URI (copied to a
    local cache once).
    """
    import ray

    from rayapp.data import storage

    if concurrency is None:
        bound = preprocess_actors if preprocess_actors is not None else DEFAULT_CONCURRENCY
        concurrency = max(bound) if isinstance(bound, tuple) else int(bound)
    block = max(batch_size, rows_per_block)
    filesystem, files, columns = _input(path)
    units = read_units(filesystem, files)
    tokenizer = os.fspath(tokenizer_dir) if storage.is_uri(tokenizer_dir) else os.path.abspath(tokenizer_dir)
    # a URI tokenizer is fetched by each node itself, with the driver's filesystem (and credentials)
    via = storage.resolve(tokenizer) if storage.is_uri(tokenizer) else None
    tasks = ray.data.TaskPoolStrategy(size=concurrency)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        decode_pair_chunks,
        fn_kwargs={"filesystem": filesystem, "columns": columns, "image_size": image_size,
                   "tokenizer_dir": tokenizer, "tokenizer_via": via, "max_length": max_length,
                   "pairs_per_chunk": block},
        batch_size=1, batch_format="numpy", compute=tasks, num_cpus=cpus_per_task,
    )
    if shuffle_seed is not None:
        ds = ds.random_shuffle(seed=shuffle_seed, num_cpus=cpus_per_task)
    ds = ds.repartition(target_num_rows_per_block=block)
    ds = ds.map_batches(normalize_pair_batch, fn_kwargs={"with_ids": with_ids}, batch_size=block,
                        batch_format="numpy", compute=tasks, num_cpus=cpus_per_task)
    # units finish in any order; without this the shuffle's input order, and so its output, varies
    ds.context.execution_options.preserve_order = preserve_order
    return ds


def train_data_config(preserve_order: bool = True):
    """`ray.train.DataConfig` that shards every dataset (train and val) and keeps the seeded block order."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = preserve_order
    return DataConfig(datasets_to_split="all", execution_options=options)


def val_split_path(data_dir: str | os.PathLike) -> str:
    """DATA_DIR/val, or DATA_DIR/validation when only that exists (ImageRewardDB's split name)."""
    from rayapp.data import storage

    val = storage.join(data_dir, "val")
    validation = storage.join(data_dir, "validation")
    if storage.file_type(val) == "missing" and storage.file_type(validation) == "dir":
        return validation
    return val


def build_train_val_datasets(data_dir: str | os.PathLike | None = None, *, image_size: int, max_length: int,
                             tokenizer_dir: str | os.PathLike | None = None,
                             train_path: str | os.PathLike | None = None, val_path: str | os.PathLike | None = None,
                             shuffle_seed: int = 1234, **options) -> dict:
    """`{"train": ..., "val": ...}` for `TorchTrainer(datasets=...)`; workers read `ray.train.get_dataset_shard`.

    Paths (local or URIs) default to DATA_DIR/train, DATA_DIR/val and DATA_DIR/tokenizer (the `rayapp data
    synth` layout); without a val/, DATA_DIR/validation (what `rayapp data convert --format imagerewarddb`
    writes). Train is shuffled with `shuffle_seed`; validation keeps file order. `options` go to
    `build_pair_dataset`.
    """
    from rayapp.data import storage

    if data_dir is None and (train_path is None or val_path is None or tokenizer_dir is None):
        raise ValueError("pass data_dir, or all of train_path, val_path and tokenizer_dir")
    train_path = train_path or storage.join(data_dir, "train")
    val_path = val_path or val_split_path(data_dir)
    tokenizer_dir = tokenizer_dir or storage.join(data_dir, "tokenizer")
    common = {"image_size": image_size, "tokenizer_dir": tokenizer_dir, "max_length": max_length, **options}
    return {
        "train": build_pair_dataset(train_path, shuffle_seed=shuffle_seed, **common),
        "val": build_pair_dataset(val_path, shuffle_seed=None, **common),
    }
