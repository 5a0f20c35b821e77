"""Ray Data pipeline: Parquet comparison shards -> (better, worse) pairs -> preprocessed training rows.

read_parquet -> flat_map (one row per unequal-rank pair, image bytes still encoded) -> optional seeded
random_shuffle (moves compact PNG/JPEG bytes, not float tensors) -> map_batches with a callable class that
decodes with `load_image`, preprocesses with THE shared `preprocess_pil`, and tokenises with a tokenizer
loaded once per actor.

Output columns (DESIGN.md): pixels_better, pixels_worse float32 [3,S,S]; input_ids, attention_mask int64
[max_length]; pair_kind string ("caption" / "quality" / "both" for the synthetic set, "human" otherwise);
with `with_ids=True` also pair_id "ID:better>worse". In Ray 2.60 `iter_torch_batches` fails on the string
columns (and a `dtypes` dict must name every column): iterate with `torch_batches(shard_or_dataset, ...)`,
which goes through numpy batches and keeps pair_kind / pair_id as lists of str.

Resources: every data operator asks for `cpus_per_task` (default 0.25) logical CPUs, so the pipeline keeps
running next to train workers that hold whole CPUs (Ray Data waits forever for a CPU the train workers hold).
The test cluster has 8 logical CPUs on 2 cores; a 2-CPU cluster needs train workers of <= 0.5 CPU each.
Nothing here collects the dataset into one process: blocks stream through the object store.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# the plain-Python (no Ray) views of the same data, re-exported for evaluation code
from rayapp.data.pairs import expand_pairs, iter_pairs  # noqa: F401
from rayapp.data.shards import iter_comparisons  # noqa: F401

DEFAULT_CPUS_PER_TASK = 0.25
DEFAULT_BATCH_SIZE = 32
DEFAULT_ROWS_PER_BLOCK = 128  # pairs per block entering preprocessing
OUTPUT_COLUMNS = ("pixels_better", "pixels_worse", "input_ids", "attention_mask", "pair_kind")


def _input_columns(path: str | os.PathLike) -> list[str]:
    """Columns to read: the comparison schema, plus faithfulness/quality when the shards have them."""
    import pyarrow.parquet as pq

    from rayapp.data.shards import parquet_files

    first = parquet_files(path)[0]
    names = set(pq.read_schema(first).names)
    required = ["id", "prompt", "images", "ranking"]
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{first}: not a comparison shard, missing columns {missing}")
    return required + [c for c in ("faithfulness", "quality") if c in names]


def pair_rows(record: dict) -> list[dict]:
    """Ray flat_map fn: one output row per unequal-rank pair, with the two images' encoded bytes."""
    images = list(record["images"])
    plain = {
        "id": str(record["id"]),
        "prompt": str(record["prompt"]),
        "ranking": [int(r) for r in record["ranking"]],
    }
    for name in ("faithfulness", "quality"):
        if record.get(name) is not None:
            plain[name] = [int(v) for v in record[name]]
    rows = []
    for pair in expand_pairs(plain):
        rows.append({
            "pair_id": f"{pair['id']}:{pair['better']}>{pair['worse']}",
            "prompt": pair["prompt"],
            "image_better": bytes(images[pair["better"]]),
            "image_worse": bytes(images[pair["worse"]]),
            "pair_kind": pair["pair_kind"],
        })
    return rows


class PairPreprocessor:
    """map_batches callable: decode + `preprocess_pil` both images, tokenise the prompt (tokenizer loaded once)."""

    def __init__(self, image_size: int, tokenizer_dir: str, max_length: int, with_ids: bool = False):
        from rayapp.model.tokenizer import load_tokenizer

        self.image_size = image_size
        self.max_length = max_length
        self.with_ids = with_ids
        self.tokenizer = load_tokenizer(tokenizer_dir)

    def _pixels(self, images, cache: dict, label: str) -> np.ndarray:
        from rayapp.model.images import ImageInputError, load_image, preprocess_pil

        out = []
        for i, data in enumerate(images):
            data = bytes(data)
            if data not in cache:  # an image recurs in up to K-1 pairs of its prompt
                try:
                    cache[data] = preprocess_pil(load_image(data, i), self.image_size).numpy()
                except ImageInputError as err:
                    raise ImageInputError(f"{label} of pair {self._ids[i]}: {err}") from err
            out.append(cache[data])
        return np.stack(out).astype(np.float32, copy=False)

    def __call__(self, batch: dict) -> dict:
        self._ids = [str(p) for p in batch["pair_id"]]
        cache: dict[bytes, np.ndarray] = {}
        enc = self.tokenizer(
            [str(p) for p in batch["prompt"]], padding="max_length", truncation=True,
            max_length=self.max_length, return_tensors="np",
        )
        out = {
            "pixels_better": self._pixels(batch["image_better"], cache, "image_better"),
            "pixels_worse": self._pixels(batch["image_worse"], cache, "image_worse"),
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
            "pair_kind": np.asarray([str(k) for k in batch["pair_kind"]], dtype=object),
        }
        if self.with_ids:
            out["pair_id"] = np.asarray(self._ids, dtype=object)
        return out


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
            name: (torch.from_numpy(np.ascontiguousarray(value)) if name in TENSOR_COLUMNS
                   else [str(v) for v in value])
            for name, value in batch.items()
        }


def build_pair_rows(path: str | os.PathLike, *, shuffle_seed: int | None = None,
                    cpus_per_task: float = DEFAULT_CPUS_PER_TASK, rows_per_block: int = DEFAULT_ROWS_PER_BLOCK):
    """A lazy dataset of still-encoded pairs: pair_id, prompt, image_better, image_worse (bytes), pair_kind.

    The first half of the pipeline, also useful for batch scoring / evaluation that preprocesses itself.
    """
    import ray

    ds = ray.data.read_parquet(os.fspath(path), columns=_input_columns(path), num_cpus=cpus_per_task)
    ds = ds.flat_map(pair_rows, num_cpus=cpus_per_task)
    if shuffle_seed is not None:
        ds = ds.random_shuffle(seed=shuffle_seed, num_cpus=cpus_per_task)
    # one Parquet file becomes one block of ~K^2/2 pairs per prompt; smaller blocks let several
    # preprocessing actors and both train shards work at once
    ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    # read tasks finish in any order; without this the shuffle's input order, and so its output, varies
    ds.context.execution_options.preserve_order = True
    return ds


def build_pair_dataset(path: str | os.PathLike, *, image_size: int, tokenizer_dir: str | os.PathLike,
                       max_length: int, shuffle_seed: int | None = None, with_ids: bool = False,
                       batch_size: int = DEFAULT_BATCH_SIZE, cpus_per_task: float = DEFAULT_CPUS_PER_TASK,
                       preprocess_actors: int | tuple[int, int] = (1, 2), preserve_order: bool = True):
    """A lazy `ray.data.Dataset` of preprocessed (better, worse) pairs from a Parquet shard dir.

    `shuffle_seed` set: a seeded full shuffle of the pairs (same order every epoch; add a per-epoch
    `local_shuffle_seed` when iterating for variety). None: file order. `preserve_order` keeps that order
    through the parallel preprocessing actors, so a seed fixes the output order when iterating this
    dataset directly; Ray Train replaces the execution options with its DataConfig's (see
    `train_data_config`), and `streaming_split` hands blocks to whichever worker asks first.
    `preprocess_actors`: actor count (or (min, max) autoscaling range) for decoding + preprocessing.
    """
    ds = build_pair_rows(path, shuffle_seed=shuffle_seed, cpus_per_task=cpus_per_task,
                         rows_per_block=max(batch_size, DEFAULT_ROWS_PER_BLOCK))
    ds = ds.map_batches(
        PairPreprocessor,
        fn_constructor_kwargs={"image_size": image_size, "tokenizer_dir": os.fspath(tokenizer_dir),
                               "max_length": max_length, "with_ids": with_ids},
        batch_size=batch_size, batch_format="numpy", concurrency=preprocess_actors, num_cpus=cpus_per_task,
    )
    ds.context.execution_options.preserve_order = preserve_order
    return ds


def train_data_config(preserve_order: bool = True):
    """`ray.train.DataConfig` that shards every dataset (train and val) and keeps the seeded block order."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = preserve_order
    return DataConfig(datasets_to_split="all", execution_options=options)


def build_train_val_datasets(data_dir: str | os.PathLike | None = None, *, image_size: int, max_length: int,
                             tokenizer_dir: str | os.PathLike | None = None,
                             train_path: str | os.PathLike | None = None, val_path: str | os.PathLike | None = None,
                             shuffle_seed: int = 1234, **options) -> dict:
    """`{"train": ..., "val": ...}` for `TorchTrainer(datasets=...)`; workers read `ray.train.get_dataset_shard`.

    Paths default to DATA_DIR/train, DATA_DIR/val and DATA_DIR/tokenizer (the `rayapp data synth` layout).
    Train is shuffled with `shuffle_seed`; validation keeps file order. `options` go to `build_pair_dataset`.
    """
    if data_dir is None and (train_path is None or val_path is None or tokenizer_dir is None):
        raise ValueError("pass data_dir, or all of train_path, val_path and tokenizer_dir")
    root = Path(data_dir) if data_dir is not None else None
    train_path = train_path or root / "train"
    val_path = val_path or root / "val"
    tokenizer_dir = tokenizer_dir or root / "tokenizer"
    common = {"image_size": image_size, "tokenizer_dir": tokenizer_dir, "max_length": max_length, **options}
    return {
        "train": build_pair_dataset(train_path, shuffle_seed=shuffle_seed, **common),
        "val": build_pair_dataset(val_path, shuffle_seed=None, **common),
    }
