"""The one training loop: every Ray Train worker of reward-model training and of ReFL runs `train_worker`.

A trainer plugs in a `TrainingTask` (its model, its micro-step, its evaluation and its export). This loop owns
everything else: restore and restarts, the update / gradient-accumulation cycle, callbacks, the report,
evaluation and checkpoint schedule, progress lines with an ETA, run tracking on rank 0, the final checkpoint and
what resuming a finished run does (the same for every trainer: the export is registered again, nothing re-runs).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoints, cluster
from . import engine as rt
from .callbacks import UpdateCallback, notify
from .config import TrainingConfig

logger = logging.getLogger(__name__)

CURVES_DIR = "curves"  # PNG curves inside the final checkpoint (copied to the run's output dir)


@dataclass(frozen=True)
class Schedule:
    """When the loop updates, evaluates, checkpoints and reports; the same on every rank."""

    total_steps: int  # optimizer updates in the whole run
    eval_steps: tuple[int, ...]  # update counts after which to evaluate (0: before the first update)
    checkpoint_steps: tuple[int, ...]  # update counts after which to checkpoint (the last always is)
    log_every: int  # report + progress line every this many updates (0: only with evaluations/checkpoints)
    examples_per_update: int  # examples over all workers per update (for the throughput figure)
    example_unit: str  # what an example is, in progress lines and metric names ("pairs", "prompts")
    steps_per_epoch: int | None = None  # updates per pass over the data (None: the data is endless)


@dataclass
class WorkerPlan:
    """Everything a worker needs, built once on the driver (it travels to the workers by pickle)."""

    job: str  # short name of the trainer ("rm", "refl"): progress prefix and tracking experiment
    task: type  # the TrainingTask subclass every worker instantiates
    config: TrainingConfig  # the resolved, validated config
    schedule: Schedule
    task_plan: Any  # the trainer's own typed plan (data locations, tokenizer, ...)
    run_dir: str  # the run's output directory (tracking files go under it on rank 0's node)
    tracking: tuple[str, ...] = ()  # tracker names (rayapp.runtime.tracking)
    # the driver's tracker settings (MLFLOW_*, WANDB_*, credentials included); out of the repr because Ray Train's
    # state API shows str(train_loop_config) on the dashboard
    tracking_env: dict = field(default_factory=dict, repr=False)
    callbacks: tuple[UpdateCallback, ...] = ()
    verbose: bool = False


@dataclass
class LoopState:
    """What a checkpoint records of the loop (JSON); a restarted worker group continues from it."""

    step: int = 0  # updates done
    completed_updates: list[int] = field(default_factory=list)  # 0-based updates in the weights' history
    restarts: int = 0  # worker-group restarts (and resumes) this run went through
    finished: bool = False  # the final checkpoint (with the export) was written at `step`
    eval_history: list[dict] = field(default_factory=list)  # every evaluation: {"step", metrics...}
    reports: list[dict] = field(default_factory=list)  # every reported metrics dict (numbers only)
    updates: list[dict] = field(default_factory=list)  # rank 0's per-update records (trainers that keep one)
    final_metrics: dict = field(default_factory=dict)  # the final report's metrics
    task: dict = field(default_factory=dict)  # the trainer's own JSON state
    tracker: dict = field(default_factory=dict)  # tracker run ids, so a restart continues the same runs

    @classmethod
    def from_json(cls, data: dict) -> LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Worker:
    """This worker's place in the run."""

    rank: int
    world_size: int
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    config: TrainingConfig
    schedule: Schedule


class TrainingTask:
    """What a trainer supplies to the loop. Methods without "rank 0" in their docstring run on every rank."""

    optimizer = "Adam"  # DeepSpeed optimizer type ("Adam": plain Adam; "AdamW": decoupled weight decay)
    trains_frozen_subset = False  # True: checkpoints hold only trainable weights (LoRA) and load non-strictly

    def __init__(self, worker: Worker, plan: Any):
        self.worker, self.plan = worker, plan

    def build_model(self) -> torch.nn.Module:
        """The module DeepSpeed trains (after this, frozen parts are set)."""
        raise NotImplementedError

    def attach(self, engine) -> None:
        """Called once with the DeepSpeed engine, before any restore."""

    def micro_step(self, engine, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of micro-batch `micro` of update `step` and numbers to average into the train metrics."""
        raise NotImplementedError

    def after_update(self, engine, step: int) -> None:
        """After the optimizer update `step` (e.g. an EMA step)."""

    def update_record(self, step: int, micro_stats: list[dict[str, float]]) -> dict | None:
        """Rank 0: a log entry of update `step` to keep in the loop state, or None."""
        return None

    def evaluate(self, engine, step: int) -> dict:
        """Evaluation after `step` updates; every rank calls it, ranks that do not evaluate return {}."""
        return {}

    def finalize(self, engine, state: LoopState) -> dict:
        """Before the final checkpoint: bring the engine to the weights to export; returns final metrics."""
        return {}

    def save_files(self, directory: Path) -> None:
        """Rank 0: the trainer's files beside DeepSpeed's in every checkpoint."""

    def load_files(self, directory: Path) -> None:
        """The trainer's files of a restored checkpoint (while it is on local disk)."""

    def export(self, directory: Path) -> None:
        """Rank 0: the exported model into the final checkpoint."""
        raise NotImplementedError

    def curves(self, state: LoopState, directory: Path) -> list[Path]:
        """Rank 0: PNG curves of the run, drawn from the loop state into `directory`."""
        return []

    def state_dict(self) -> dict:
        """The trainer's own JSON state for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_eta(seconds: float) -> str:
    """h:mm:ss."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Window:
    """Train numbers summed since the last report, averaged over all ranks when reported."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.updates, self.started = 0, time.perf_counter()

    def add(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0.0) + 1.0
        self.updates += 1

    def reduce(self, device) -> dict[str, float]:
        """Collective: {train_<key>: mean over ranks and updates}. Every rank has the same keys (same steps)."""
        keys = sorted(self.sums)
        totals = rt.all_reduce_sum([self.sums[k] for k in keys] + [self.counts[k] for k in keys], device)
        return {f"train_{k}": totals[i] / max(totals[len(keys) + i], 1.0) for i, k in enumerate(keys)}


class Loop:
    """One worker's run of the loop (built and run by `train_worker`)."""

    def __init__(self, plan: WorkerPlan):
        import ray.train
        from ray.train.torch import get_device

        self.plan, self.config, self.schedule = plan, plan.config, plan.schedule
        context = ray.train.get_context()
        device = get_device()
        precision = rt.resolve_precision(self.config.precision, device.type == "cuda")
        self.worker = Worker(context.get_world_rank(), context.get_world_size(), device, precision, self.config,
                             self.schedule)
        storage = context.get_storage()
        self.storage_root, self.experiment = storage.storage_fs_path, storage.experiment_dir_name
        self.experiment_path = storage.experiment_fs_path
        self.task: TrainingTask = plan.task(self.worker, plan.task_plan)
        self.state = LoopState()
        self.tracker = None
        self.checkpoint_path: str | None = None
        self.step_seconds: list[float] = []  # this attempt's seconds per update

    @property
    def rank(self) -> int:
        return self.worker.rank

    def notify(self, when: str, step: int, metrics: dict | None = None) -> None:
        notify(self.plan.callbacks, when, step, self.rank, self.storage_root, self.experiment, metrics or {})

    def run(self) -> None:
        cluster.log_worker_nodes()
        model = self.task.build_model()
        rt.seed_everything(self.config.seed + self.rank)  # after the weights: dropout and noise differ per rank
        self.engine = rt.initialize_engine(model, self.config, total_steps=self.schedule.total_steps,
                                           world_size=self.worker.world_size, precision=self.worker.precision,
                                           optimizer=self.task.optimizer)
        self.task.attach(self.engine)
        self.restore()
        self.open_tracker()
        try:
            if self.state.finished and self.state.step >= self.schedule.total_steps:
                self.register_finished_run()
            else:
                self.train()
        except BaseException:
            self.close_tracker(failed=True)
            raise
        self.close_tracker()

    def restore(self) -> None:
        restored = checkpoints.restore_checkpoint(
            self.engine, resume_from=self.config.resume_from, strict=not self.task.trains_frozen_subset,
            on_directory=self.task.load_files)
        if restored is None:
            return
        self.state = LoopState.from_json(restored)
        self.state.restarts += 1
        self.task.load_state_dict(self.state.task)
        self.checkpoint_path = restored.get("checkpoint_path")
        if not str(self.checkpoint_path or "").startswith(self.experiment_path):
            self.state.tracker = {}  # resumed from another run's checkpoint: this run gets its own tracker runs
        if self.state.finished and self.state.step < self.schedule.total_steps:
            self.state.finished = False  # a finished run resumed with more updates to make: it goes on

    def open_tracker(self) -> None:
        if self.rank != 0 or not self.plan.tracking:
            return
        from .tracking import RunTracker

        self.tracker = RunTracker(self.plan.tracking, run_dir=self.plan.run_dir, run_name=self.config.run_name,
                                  job=f"rayapp-{self.plan.job}", params=self.config.to_dict(),
                                  env=self.plan.tracking_env, resume=self.state.tracker or None)
        self.state.tracker = self.tracker.state()

    def close_tracker(self, failed: bool = False) -> None:
        if self.tracker is not None:
            self.tracker.close(failed=failed)
            self.tracker = None

    def train(self) -> None:
        schedule, state = self.schedule, self.state
        eval_steps, checkpoint_steps = set(schedule.eval_steps), set(schedule.checkpoint_steps)
        if 0 in eval_steps and state.step == 0 and not state.eval_history:
            self.report(self.evaluate(0), step=0)
        window = Window()
        pending: dict = {}
        accumulation = self.config.gradient_accumulation_steps
        while state.step < schedule.total_steps:
            step = state.step
            self.notify("before", step)
            started = time.perf_counter()
            micro_stats = []
            for micro in range(accumulation):
                loss, stats = self.task.micro_step(self.engine, step, micro)
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed updates the weights only at the accumulation boundary
                micro_stats.append(stats)
            self.task.after_update(self.engine, step)
            update_stats = {k: statistics.fmean(s[k] for s in micro_stats if k in s)
                            for k in sorted({k for s in micro_stats for k in s})}
            window.add(update_stats)
            state.step = step + 1
            state.completed_updates.append(step)
            self.step_seconds.append(time.perf_counter() - started)
            if self.rank == 0:
                record = self.task.update_record(step, micro_stats)
                if record is not None:
                    state.updates.append(record)
            self.notify("after", step, {f"train_{k}": v for k, v in update_stats.items()})

            done = state.step
            is_last = done >= schedule.total_steps
            do_eval = done in eval_steps or is_last
            do_checkpoint = done in checkpoint_steps and not is_last
            do_log = is_last or (schedule.log_every and done % schedule.log_every == 0)
            if not (do_eval or do_checkpoint or do_log):
                continue
            metrics = {**window.reduce(self.worker.device), **self.timing(window)}
            if do_eval:
                metrics.update(self.evaluate(done))
            if is_last:
                pending = metrics  # reported once, with the final checkpoint
            else:
                self.report(metrics, step=done, checkpoint=do_checkpoint)
            window = Window()  # after evaluation and checkpoint: throughput counts training time only
        self.finish(pending)

    def timing(self, window: Window) -> dict:
        """Throughput, seconds per update, learning rate and memory for a report."""
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        recent = self.step_seconds[1:] or self.step_seconds  # the first update includes data start-up
        return {
            f"{self.schedule.example_unit}_per_s": window.updates * self.schedule.examples_per_update / elapsed,
            "train_step_seconds": statistics.fmean(self.step_seconds) if self.step_seconds else 0.0,
            "train_step_seconds_median": statistics.median(recent) if recent else 0.0,
            "lr": self.engine.get_lr()[0],
            "peak_memory_mb": peak_memory_mb(self.worker.device),
        }

    def evaluate(self, step: int) -> dict:
        metrics = self.task.evaluate(self.engine, step)
        if metrics and self.rank == 0:
            self.state.eval_history.append({"step": step, **metrics})
        return metrics

    def report(self, metrics: dict, *, step: int, checkpoint: bool = False, final: bool = False,
               dir_name: str | None = None) -> None:
        """Collective: one `ray.train.report` (with a checkpoint if asked), the progress line and the trackers."""
        metrics = {**metrics, "step": step, "restarts": self.state.restarts}
        if self.schedule.steps_per_epoch:
            metrics["epoch"] = step / self.schedule.steps_per_epoch
        if final:
            metrics["finished"] = True
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.rank == 0:
            self.state.reports.append(numbers)
            logger.info(self.progress_line(metrics))
            if self.tracker is not None:
                self.tracker.log_metrics(numbers, step)
        if not checkpoint:
            checkpoints.report(metrics)
            return
        self.state.task = self.task.state_dict()
        state = self.state.to_json()

        def files(directory: Path) -> None:
            self.task.save_files(directory)
            if final:
                self.task.export(directory)
                self.write_curves(directory)

        checkpoints.report(metrics, engine=self.engine, state=state, extra=files,
                           exclude_frozen=self.task.trains_frozen_subset, dir_name=dir_name)

    def progress_line(self, metrics: dict) -> str:
        """`[job] step n/N (epoch e)  <train and eval numbers>  throughput  s/update  eta`."""
        step, total = metrics["step"], self.schedule.total_steps
        parts = [f"[{self.plan.job}] step {step}/{total}"]
        if "epoch" in metrics:
            parts[0] += f" (epoch {metrics['epoch']:.2f})"
        for key, value in metrics.items():
            if key.startswith(("train_loss", "train_reward", "val_loss", "val_acc", "eval_reward")) \
                    and isinstance(value, float) and not key.endswith("_median") and "acc_" not in key:
                parts.append(f"{key} {value:.4g}")
        unit = f"{self.schedule.example_unit}_per_s"
        if unit in metrics:
            parts.append(f"{metrics[unit]:.1f} {self.schedule.example_unit}/s")
        if self.step_seconds:
            recent = self.step_seconds[-20:]
            parts.append(f"{statistics.fmean(recent):.2f} s/update")
            parts.append(f"eta {format_eta(statistics.fmean(recent) * (total - step))}")
        return "  ".join(parts)

    def write_curves(self, directory: Path) -> None:
        """Rank 0: the trainer's curves into the final checkpoint, and to the trackers."""
        paths = self.task.curves(self.state, directory / CURVES_DIR)
        if self.tracker is not None:
            for path in paths:
                self.tracker.log_artifact(str(path))
            if (directory / "eval").is_dir():
                self.tracker.log_artifact(str(directory / "eval"))

    def finish(self, pending: dict) -> None:
        """The final checkpoint: DeepSpeed's state of the exported weights, the export, the curves."""
        state = self.state
        final = {**pending, **self.task.finalize(self.engine, state)}
        state.finished = True
        state.final_metrics = {k: v for k, v in final.items() if isinstance(v, (int, float, str, type(None)))}
        name = final_checkpoint_name()
        self.report(final, step=state.step, checkpoint=True, final=True, dir_name=name)
        if self.tracker is not None:
            self.tracker.log_text("export", f"{self.experiment_path}/{name}")

    def register_finished_run(self) -> None:
        """A restart found the final checkpoint already written: report it again so Ray Train's result points
        at it; nothing is trained, evaluated or exported again."""
        import ray.train

        logger.info("[%s] the run finished at update %d; registering its export again", self.plan.job,
                    self.state.step)
        registered = ray.train.get_checkpoint()
        checkpoint = None
        path = self.checkpoint_path
        if self.rank == 0 and path and (registered is None or registered.path != path):
            filesystem = ray.train.get_context().get_storage().storage_filesystem
            checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
        metrics = {**self.state.final_metrics, "step": self.state.step, "restarts": self.state.restarts,
                   "finished": True}
        ray.train.report(metrics, checkpoint=checkpoint)


def final_checkpoint_name() -> str:
    """Rank 0's timestamped checkpoint directory name, the same on every rank (they write into one dir)."""
    name = [datetime.datetime.now().strftime("checkpoint_%Y-%m-%d_%H-%M-%S.%f")]
    if rt.world()[1] > 1:
        torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def train_worker(loop_config: dict) -> None:
    """Ray Train's train function (one per worker): the loop with the plan in `loop_config["plan"]`."""
    from rayapp.logs import setup_logging

    plan: WorkerPlan = loop_config["plan"]
    setup_logging(verbose=plan.verbose)
    cluster.quiet_report_log()
    Loop(plan).run()


