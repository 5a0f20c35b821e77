"""Checkpoints of a DeepSpeed engine through Ray Train: per-rank completion markers, discovery of the newest
complete one (also past a half-written one), exact-step resume, and metric reports."""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .config import TrainingConfig
from .engine import world

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
    # Written last: a persisted checkpoint holding every rank's marker is complete (see newest_checkpoint).
    (directory / f"{DONE_PREFIX}{rank}").write_text("ok")


def report(metrics: dict, engine=None, state: dict | None = None, extra: Callable[[Path], None] | None = None,
           *, exclude_frozen: bool = False) -> None:
    """`ray.train.report` from every rank; with `engine`, also a checkpoint of it and `state`."""
    import ray.train

    if engine is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="rayapp-ckpt-") as tmp:
        save_checkpoint(engine, tmp, state or {}, extra, exclude_frozen=exclude_frozen)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def read_checkpoint_state(filesystem, path: str) -> dict | None:
    """The loop state of a persisted checkpoint dir, or None unless every rank finished writing it."""
    import pyarrow.fs

    try:
        with filesystem.open_input_stream(f"{path}/{STATE_FILE}") as stream:
            state = json.loads(stream.read().decode())
        names = {info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(path))}
    except (OSError, ValueError):
        return None
    ranks = state.get("world_size", 1)
    if state.get("finished") or all(f"{DONE_PREFIX}{r}" in names for r in range(ranks)):
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
    without their own can still write checkpoints."""
    import ray.train

    from rayapp.data import storage

    if storage.is_uri(config.storage_path):
        filesystem, inner = storage.resolve(config.storage_path)
        where = {"storage_path": inner, "storage_filesystem": filesystem}
    else:
        where = {"storage_path": config.storage_path}
    return ray.train.RunConfig(
        name=config.run_name, **where,
        failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_to_keep),
        logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
    )


def newest_checkpoint(resume_from: str | None = None):
    """The complete checkpoint with the highest step: Ray Train's latest, a newer complete one in the run's
    storage, else `resume_from`; None when there is none.

    Ray Train registers a reported checkpoint only when its controller next polls the workers; a worker that
    dies right after reporting can take that registration with it although every rank's files were persisted.
    Scanning storage for complete checkpoints (all rank markers present) recovers them, and skips one cut off
    half-written. Rank 0 chooses; all ranks follow.
    """
    import pyarrow.fs
    import ray.train

    chosen = None
    if world()[0] == 0:
        best_step = -1
        registered = ray.train.get_checkpoint()
        if registered is not None:
            state = read_checkpoint_state(registered.filesystem, registered.path)
            if state is not None:
                chosen, best_step = registered, state["step"]
        storage = ray.train.get_context().get_storage()
        filesystem, root = storage.storage_filesystem, storage.experiment_fs_path
        try:
            entries = filesystem.get_file_info(pyarrow.fs.FileSelector(root))
        except OSError:
            entries = []
        for info in sorted(entries, key=lambda i: i.path):
            if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            state = read_checkpoint_state(filesystem, info.path)
            if state is not None and state["step"] > best_step:
                best_step = state["step"]
                chosen = ray.train.Checkpoint(info.path, filesystem=filesystem)
            elif state is None:
                logger.warning("skipping incomplete checkpoint %s (not every rank finished writing it)", info.path)
        if chosen is None and resume_from:
            candidate = _checkpoint_at(resume_from)
            if read_checkpoint_state(candidate.filesystem, candidate.path) is None:
                raise ValueError(f"resume_from {resume_from!r} is not a complete rayapp checkpoint "
                                 f"(no {STATE_FILE} or a rank's completion marker is missing)")
            chosen = candidate
    if world()[1] > 1:
        box = [chosen]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen = box[0]
    return chosen


def restore_checkpoint(engine, *, resume_from: str | None = None, strict: bool = True,
                       on_directory: Callable[[Path], None] | None = None) -> dict | None:
    """Load the newest complete checkpoint into `engine`; returns our loop state, None if there is none.

    `on_directory(dir)` runs while the checkpoint is on local disk, for files beside DeepSpeed's. `strict=False`
    accepts checkpoints that hold only the trained weights (LoRA adapters).
    """
    checkpoint = newest_checkpoint(resume_from)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        state["checkpoint_path"] = checkpoint.path
        if state.get("finished"):
            return state  # a final export checkpoint: nothing left to train, no engine state in it
        load_path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=strict,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {checkpoint.path}")
        if on_directory is not None:
            on_directory(directory)
    logger.info("resumed at update %s from %s", state["step"], checkpoint.path)
    return state
