"""Checkpoints of a DeepSpeed engine through Ray Train: per-rank completion markers, discovery of the newest
complete one (also past a half-written one), exact-step resume, metric reports, and storage outages waited out
(uploads, listings and restores retry while the store is unreachable: see `storage_retry`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .config import TrainingConfig
from .engine import world
from .storage_retry import display, patient_filesystem, unwrap, with_storage_retries

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"  # our loop state (step, completed updates, ...) next to DeepSpeed's files
DONE_PREFIX = "rank_done."  # one marker per rank, written after its part of a checkpoint
DS_TAG = "ds"  # DeepSpeed checkpoint tag (sub-directory) inside a Ray Train checkpoint


def save_checkpoint(engine, directory: str | Path, state: dict, extra: Callable[[Path], None] | None = None,
                    *, exclude_frozen: bool = False) -> None:
    """Collective: DeepSpeed engine (weights, optimizer, scheduler) + our loop state into `directory`.

    Every rank writes its own ZeRO partition; rank 0 writes `trainer_state.json` and calls `extra(dir)` for
    anything else. `exclude_frozen` leaves frozen weights out (LoRA: only the adapters are trained).
    """
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=DS_TAG, exclude_frozen_parameters=exclude_frozen)
    rank, world_size = world()
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({**state, "world_size": world_size}))
        if extra is not None:
            extra(directory)
    # Written last: a checkpoint directory holding every rank's marker is complete (see newest_checkpoint).
    # Uploads put it last again (upload_checkpoint).
    (directory / f"{DONE_PREFIX}{rank}").write_text("ok")


def _upload_file(local: Path, filesystem, target: str, made_dirs: set[str]) -> None:
    import pyarrow.fs

    parent = target.rsplit("/", 1)[0]
    if parent not in made_dirs:
        filesystem.create_dir(parent, recursive=True)
        made_dirs.add(parent)
    # A whole file per attempt: an object store shows an object only once its upload completed, and a retry
    # after the store restarted needs a new upload session anyway.
    pyarrow.fs.copy_files(str(local), target, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=filesystem, chunk_size=64 * 1024 * 1024, use_threads=False)


def upload_checkpoint(checkpoint, checkpoint_dir_name: str, *, retry_seconds: float | None = None):
    """Ray Train's `checkpoint_upload_fn`: this rank's local checkpoint files into the run's `checkpoint_dir_name`,
    its completion marker after every other file, each file retried while the storage is unreachable.

    Ray Train's own upload copies a directory in whatever order the local listing gives, so a marker could land
    before the files it vouches for; and it fails at the first connection error.
    """
    import ray.train

    storage = ray.train.get_context().get_storage()
    filesystem = unwrap(storage.storage_filesystem)  # the files are local already: retried here, whole
    destination = f"{storage.experiment_fs_path}/{checkpoint_dir_name}"
    source = Path(checkpoint.path)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    last = [p for p in files if p.parent == source and p.name == STATE_FILE]
    last += [p for p in files if p.parent == source and p.name.startswith(DONE_PREFIX)]
    made_dirs: set[str] = set()
    # The loop state after the rank's other files (so a final checkpoint whose state is there is whole), the
    # marker after everything
    for local in [p for p in files if p not in last] + last:
        target = f"{destination}/{local.relative_to(source).as_posix()}"
        with_storage_retries(f"uploading {display(filesystem, target)}",
                             lambda local=local, target=target: _upload_file(local, filesystem, target, made_dirs),
                             retry_seconds=retry_seconds)
    return ray.train.Checkpoint(destination, filesystem=storage.storage_filesystem)


def report(metrics: dict, engine=None, state: dict | None = None, extra: Callable[[Path], None] | None = None,
           *, exclude_frozen: bool = False, dir_name: str | None = None) -> None:
    """`ray.train.report` from every rank; with `engine`, also a checkpoint of it and `state` (into `dir_name`
    if given, the same on every rank), uploaded by `upload_checkpoint` (markers last, waiting out a storage
    outage)."""
    import ray.train

    if engine is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="rayapp-ckpt-") as tmp:
        save_checkpoint(engine, tmp, state or {}, extra, exclude_frozen=exclude_frozen)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name,
                         checkpoint_upload_fn=upload_checkpoint)


def read_checkpoint_state(filesystem, path: str, *, retry_seconds: float | None = None) -> dict | None:
    """The loop state of a persisted checkpoint dir, or None unless every rank finished writing it.

    Waits for unreachable storage (a checkpoint must not look incomplete because the store was away); other
    storage errors are raised."""
    import pyarrow.fs

    def read() -> tuple[dict, set[str]] | None:
        try:
            with filesystem.open_input_stream(f"{path}/{STATE_FILE}") as stream:
                state = json.loads(stream.read().decode())
            names = {info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(path))}
        except (FileNotFoundError, ValueError):  # no state file (yet), or one cut off on a local disk
            return None
        return state, names

    found = with_storage_retries(f"reading {display(filesystem, path)}", read, retry_seconds=retry_seconds)
    if found is None:
        return None
    state, names = found
    ranks = state.get("world_size", 1)
    # The final checkpoint too: it holds every rank's engine state beside the export (runtime.loop.finish).
    if all(f"{DONE_PREFIX}{r}" in names for r in range(ranks)):
        return state
    return None


def _checkpoint_at(uri: str):
    """A Ray Train Checkpoint for a path or URI given by the user, with its filesystem resolved."""
    import ray.train

    from rayapp.data import storage

    filesystem, path = storage.resolve(uri)
    return ray.train.Checkpoint(path, filesystem=filesystem)


def run_config(config: TrainingConfig, *, verbose: bool = False):
    """The Ray Train `RunConfig` both trainers use, from a resolved `TrainingConfig`: run name, storage,
    worker-group restarts, checkpoints kept, and Ray Train's own log level (its INFO lines about starting
    worker groups only with `verbose`).

    A storage URI gets the driver's filesystem object, which carries the driver's credentials, so workers
    without their own can still write checkpoints. It must answer now (unreachable, wrong credentials or a
    missing bucket fail here, naming the URI); once the run is going, every call on it waits out an outage
    (`storage_retry.patient_filesystem`), Ray Train's own included."""
    import ray.train

    from rayapp.data import storage

    if storage.is_uri(config.storage_path):
        filesystem, inner = storage.resolve(config.storage_path)
        with storage.errors_named(config.storage_path):
            filesystem.get_file_info(inner)
        where = {"storage_path": inner, "storage_filesystem": patient_filesystem(filesystem)}
    else:
        where = {"storage_path": config.storage_path}
    return ray.train.RunConfig(
        name=config.run_name, **where,
        failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_to_keep),
        logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
    )


def newest_checkpoint(resume_from: str | None = None, *, retry_seconds: float | None = None):
    """The complete checkpoint with the highest step: Ray Train's latest, a newer complete one in the run's
    storage, else `resume_from`; None when there is none.

    Ray Train registers a reported checkpoint only when its controller next polls the workers; a worker that
    dies right after reporting can take that registration with it although every rank's files were persisted.
    Scanning storage for complete checkpoints (all rank markers present) recovers them, and skips one cut off
    half-written. Rank 0 chooses, waiting for unreachable storage; all ranks follow.
    """
    import pyarrow.fs
    import ray.train

    chosen = None
    if world()[0] == 0:
        best_step = -1
        registered = ray.train.get_checkpoint()
        if registered is not None:
            state = read_checkpoint_state(registered.filesystem, registered.path, retry_seconds=retry_seconds)
            if state is not None:
                chosen, best_step = registered, state["step"]
        storage = ray.train.get_context().get_storage()
        filesystem, root = storage.storage_filesystem, storage.experiment_fs_path
        selector = pyarrow.fs.FileSelector(root, allow_not_found=True)
        entries = with_storage_retries(f"listing {display(filesystem, root)}",
                                       lambda: filesystem.get_file_info(selector), retry_seconds=retry_seconds)
        for info in sorted(entries, key=lambda i: i.path):
            if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            state = read_checkpoint_state(filesystem, info.path, retry_seconds=retry_seconds)
            if state is not None and state["step"] > best_step:
                best_step = state["step"]
                chosen = ray.train.Checkpoint(info.path, filesystem=filesystem)
            elif state is None:
                logger.warning("skipping incomplete checkpoint %s (not every rank finished writing it)",
                               display(filesystem, info.path))
        if chosen is None and resume_from:
            candidate = _checkpoint_at(resume_from)
            if read_checkpoint_state(candidate.filesystem, candidate.path, retry_seconds=retry_seconds) is None:
                raise ValueError(f"resume_from {resume_from!r} is not a complete rayapp checkpoint "
                                 f"(no {STATE_FILE} or a rank's completion marker is missing)")
            chosen = candidate
    if world()[1] > 1:
        box = [chosen]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen = box[0]
    return chosen


def _download(checkpoint, directory: str) -> None:
    """Every file of `checkpoint` into the empty `directory` (emptied again first: a retry after a cut-off)."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    checkpoint.to_directory(directory)


def restore_checkpoint(engine, *, resume_from: str | None = None, strict: bool = True,
                       on_directory: Callable[[Path], None] | None = None,
                       retry_seconds: float | None = None) -> dict | None:
    """Load the newest complete checkpoint into `engine`; returns our loop state, None if there is none.

    `on_directory(dir)` runs while the checkpoint is on local disk, for files beside DeepSpeed's. `strict=False`
    accepts checkpoints that hold only the trained weights (LoRA adapters). Storage that is unreachable is
    waited for (`retry_seconds`, default STORAGE_RETRY_SECONDS).
    """
    import pyarrow.fs

    checkpoint = newest_checkpoint(resume_from, retry_seconds=retry_seconds)
    if checkpoint is None:
        return None
    with tempfile.TemporaryDirectory(prefix="rayapp-restore-") as tmp:
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            directory = Path(checkpoint.path)  # read in place: nothing to wait for, nothing to copy
        else:
            directory = Path(tmp) / "checkpoint"
            with_storage_retries(f"downloading {display(checkpoint.filesystem, checkpoint.path)}",
                                 lambda: _download(checkpoint, str(directory)), retry_seconds=retry_seconds)
        state = json.loads((directory / STATE_FILE).read_text())
        state["checkpoint_path"] = checkpoint.path
        load_path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=strict,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {checkpoint.path}")
        if on_directory is not None:
            on_directory(directory)
    logger.info("resumed at update %s from %s", state["step"], checkpoint.path)
    return state
