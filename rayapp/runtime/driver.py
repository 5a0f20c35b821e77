"""The driver side every trainer shares: resolve the run, size the workers once, write config.json, build and fit
the `TorchTrainer` around the one loop (`runtime.loop.train_worker`), turn Ray's errors into ours, copy the
export out of the final checkpoint and return what the run produced.

A trainer supplies a `TrainingJob`: how it resolves its config, plans its schedule, builds its datasets and which
directories of the final checkpoint it exports.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import checkpoints, cluster
from .callbacks import UpdateCallback
from .config import TrainingConfig
from .loop import CURVES_DIR, LoopState, Schedule, WorkerPlan, train_worker

logger = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """A training run failed after Ray Train's restarts; the message names the first worker's error."""


@dataclass
class TrainingRun:
    """What a finished run left on the driver."""

    config: TrainingConfig  # the resolved config the run used
    plan: WorkerPlan  # schedule and the trainer's plan, as the workers saw them
    state: LoopState  # the loop state of the final checkpoint
    metrics: dict  # the final report's metrics (rank 0)
    reports: list[dict] = field(default_factory=list)  # every report's numbers, in order
    checkpoint_path: str | None = None  # the final Ray Train checkpoint (pass as resume_from)
    output_dir: str = ""  # where the export, curves and summary.json were copied


class TrainingJob:
    """The driver-side plug of a trainer (subclass per trainer)."""

    name = ""  # short name: run-name prefix, progress prefix, tracking experiment "rayapp-<name>"
    script = ""  # the job script users run (named in resource errors)
    task: type = object  # the runtime.loop.TrainingTask subclass its workers run
    exports: tuple[str, ...] = ()  # directories of the final checkpoint copied into output_dir

    def resolve(self, config: TrainingConfig) -> TrainingConfig:
        """Fill the trainer's run-dependent fields (e.g. values read from a pipeline's configs)."""
        return config

    def plan(self, config: TrainingConfig) -> tuple[Schedule, Any]:
        """(the loop's schedule, the trainer's own plan); may make the offline data set."""
        raise NotImplementedError

    def datasets(self, config: TrainingConfig, task_plan: Any) -> dict:
        """The Ray Datasets the workers read (by name)."""
        return {}

    def describe(self, config: TrainingConfig, schedule: Schedule, task_plan: Any, resources: dict) -> str:
        """The run's derived quantities, logged once before training starts."""
        return ""


def resolve_run(config: TrainingConfig, prefix: str) -> TrainingConfig:
    """Absolute output dir, storage path (default <output_dir>/ray) and run name (default <prefix>-<time>)."""
    output_dir = os.fspath(Path(config.output_dir).resolve())
    return replace(config, output_dir=output_dir,
                   storage_path=config.storage_path or os.fspath(Path(output_dir) / "ray"),
                   run_name=config.run_name or time.strftime(f"{prefix}-%Y%m%d-%H%M%S"))


def prepare_run(job: TrainingJob, config: TrainingConfig, *, verbose: bool = False):
    """Resolve, connect, size the workers (fails fast) and plan: (config, resources, schedule, task plan)."""
    config = job.resolve(resolve_run(config, job.name))
    cluster.connect(verbose)
    if not verbose:
        cluster.quiet_data_progress_bars()
    resources = cluster.worker_resources(config, job.script)
    schedule, task_plan = job.plan(config)
    return config, resources, schedule, task_plan


def run_training(job: TrainingJob, config: TrainingConfig, *, callbacks: Sequence[UpdateCallback] = (),
                 verbose: bool = False) -> TrainingRun:
    """Train `job` on the connected Ray cluster (or a local one sized like this machine)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .tracking import check_available, parse_tracking, tracking_env

    trackers = parse_tracking(config.tracking)
    check_available(trackers)  # before any worker starts
    config, resources, schedule, task_plan = prepare_run(job, config, verbose=verbose)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save(output_dir / "config.json")
    plan = WorkerPlan(job=job.name, task=job.task, config=config, schedule=schedule, task_plan=task_plan,
                      run_dir=os.fspath(output_dir), tracking=trackers, tracking_env=tracking_env(),
                      callbacks=tuple(callbacks), verbose=verbose)
    datasets = job.datasets(config, task_plan)
    description = job.describe(config, schedule, task_plan, resources)
    if description:
        logger.info(description)
    trainer = TorchTrainer(
        train_worker, train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=config.placement_strategy),
        run_config=checkpoints.run_config(config, verbose=verbose),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise training_failed(job, config, error) from error
    if result.error is not None:
        raise training_failed(job, config, result.error) from result.error
    return collect(job, config, plan, result)


def training_failed(job: TrainingJob, config: TrainingConfig, error: BaseException) -> TrainingFailed:
    """Our error for a failed fit: the job, the restarts allowed and the first worker's root cause."""
    cause: BaseException = error
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause = failures[rank]
        where = f"rank {rank}"
    else:
        where = "the train controller"
    cause = getattr(cause, "cause", None) or cause  # a RayTaskError carries the worker's own exception
    message = " / ".join(line.strip() for line in str(cause).strip().splitlines()) or type(cause).__name__
    return TrainingFailed(f"{job.script}: run {config.run_name} failed on {where} after up to "
                          f"{config.max_failures} worker-group restarts: {type(cause).__name__}: {message}")


def collect(job: TrainingJob, config: TrainingConfig, plan: WorkerPlan, result) -> TrainingRun:
    """Copy the export and curves out of the final checkpoint into output_dir; write summary.json."""
    if result.checkpoint is None:
        raise TrainingFailed(f"{job.script}: run {config.run_name} finished without a checkpoint")
    out = Path(config.output_dir)
    with result.checkpoint.as_directory() as directory:
        directory = Path(directory)
        state = LoopState.from_json(json.loads((directory / checkpoints.STATE_FILE).read_text()))
        for name in (*job.exports, CURVES_DIR):
            source = directory / name
            if not source.is_dir():
                if name in job.exports:
                    raise TrainingFailed(f"the final checkpoint {result.checkpoint.path} has no {name}/ export")
                continue
            target = out if name == CURVES_DIR else out / name
            if name != CURVES_DIR:
                shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, dirs_exist_ok=True)
    summary = {"config": config.to_dict(), "schedule": plan.schedule.__dict__, "metrics": result.metrics,
               "reports": state.reports, "eval_history": state.eval_history, "checkpoint": result.checkpoint.path}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return TrainingRun(config=config, plan=plan, state=state, metrics=dict(result.metrics or {}),
                       reports=list(state.reports), checkpoint_path=result.checkpoint.path,
                       output_dir=os.fspath(out))
