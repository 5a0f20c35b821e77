"""Reward-model training's driver side: data, the schedule, the datasets; the shared driver does the rest.

Entry point: `train_reward_model(config)` (what `jobs/train_rm.py`, `rayapp train-rm` and the tests call).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rayapp.runtime.callbacks import UpdateCallback
from rayapp.runtime.driver import TrainingJob, TrainingRun, run_training
from rayapp.runtime.loop import Schedule

from .config import RMTrainConfig
from .task import RMPlan, RMTask

logger = logging.getLogger(__name__)


@dataclass
class RMTrainResult:
    """What a finished run produced (paths on the driver's machine)."""

    model_dir: str  # save_pretrained directory (config.json with reward_mean/std, weights, tokenizer)
    official_dir: str  # ImageReward.pt + med_config.json
    plan: RMPlan  # data dir, tokenizer, pair counts
    schedule: Schedule  # updates per epoch, total updates, evaluations, checkpoints
    metrics: dict  # the final report's metrics (rank 0)
    reports: list[dict] = field(default_factory=list)  # every metrics report, in order
    completed_updates: list[int] = field(default_factory=list)  # 0-based updates in the exported weights' history
    checkpoint_path: str | None = None  # the Ray Train checkpoint holding the export
    curve_png: str | None = None  # train / val loss and val accuracy against the update
    config: RMTrainConfig | None = None  # the resolved config the run used


def count_split_pairs(path: str | Path) -> int:
    """Unequal-rank pairs in a Parquet shard dir (path or URI); no image bytes are read."""
    from rayapp.data.pairs import pair_stats

    return pair_stats(path)["pairs"]


def ensure_data(config: RMTrainConfig) -> str:
    """The data dir (path or URI) to train on; synthesises the offline default set when none is configured."""
    if config.data_dir:
        return config.data_dir
    from rayapp.data.synth import write_synthetic_set

    out = Path(config.output_dir) / "data"
    if not (out / "synth.json").is_file():
        logger.info("no --data-dir: writing the synthetic comparison set (%d prompts) to %s",
                    config.synth_prompts, out)
        write_synthetic_set(out, prompts=config.synth_prompts, per_prompt=config.synth_per_prompt,
                            seed=config.seed, overwrite=True, progress=False)
    return str(out.resolve())


def resolve_tokenizer(config: RMTrainConfig, data_dir: str) -> str | None:
    """Tokenizer for the model and the pipeline: explicit, else the data set's own, else the init model's."""
    if config.tokenizer:
        return config.tokenizer
    from rayapp.data import storage

    source = storage.join(data_dir, "tokenizer")
    if storage.file_type(source) != "dir":
        return None
    # Tokenizers load from local files: a remote data set's tokenizer/ is copied to a local cache.
    return storage.local_dir(source)


def model_geometry(config: RMTrainConfig) -> tuple[int, int]:
    """(image_size, max_length) of the model to train, without building it or reading its weights."""
    if config.init:
        from rayapp.model.loading import load_config

        init = load_config(config.init)
        return init.image_size, init.max_length
    from rayapp.model.config import get_preset

    preset = get_preset(config.model_preset)
    return preset.image_size, preset.max_length


def should_materialize(config: RMTrainConfig, plan: RMPlan, image_size: int) -> bool:
    """Whether to keep the preprocessed pairs in the object store (see RMTrainConfig.materialize)."""
    if config.materialize != "auto":
        return config.materialize == "yes"
    pair_bytes = 2 * 3 * image_size * image_size * 4
    return (plan.train_pairs + plan.val_pairs) * pair_bytes <= config.materialize_max_gib * 2**30


def make_schedule(config: RMTrainConfig, train_pairs: int) -> Schedule:
    """Updates per epoch, total updates, when to validate and checkpoint; every rank follows it.

    Ray Train splits the training pairs equally (the remainder is dropped), each worker drops its last
    incomplete micro-batch, and an update takes gradient_accumulation_steps micro-batches. Every epoch end and
    the last update are validated and every epoch end is checkpointed.
    """
    per_worker = train_pairs // config.num_workers
    micro_batches = per_worker // config.train_batch_size
    per_epoch = micro_batches // config.gradient_accumulation_steps
    if per_epoch < 1:
        raise ValueError(
            f"{train_pairs} training pairs are too few for {config.num_workers} workers x "
            f"{config.train_batch_size} pairs x {config.gradient_accumulation_steps} accumulation")
    total = config.max_steps if config.max_steps is not None else config.num_epochs * per_epoch
    epoch_ends = set(range(per_epoch, total + 1, per_epoch))
    if config.eval_every > 0:
        evals = set(range(config.eval_every, total + 1, config.eval_every))
    else:
        per_pass = max(1, min(config.evals_per_epoch, per_epoch))
        evals = {e * per_epoch + round(k * per_epoch / per_pass)
                 for e in range((total + per_epoch - 1) // per_epoch) for k in range(1, per_pass + 1)}
    checkpoints = set(epoch_ends)
    if config.checkpoint_every:
        checkpoints |= set(range(config.checkpoint_every, total + 1, config.checkpoint_every))
    return Schedule(
        total_steps=total,
        eval_steps=tuple(sorted({s for s in evals if s <= total} | epoch_ends | {total})),
        checkpoint_steps=tuple(sorted(s for s in checkpoints if s <= total)),
        log_every=config.log_every,
        examples_per_update=config.pairs_per_update,
        example_unit="pairs",
        steps_per_epoch=per_epoch,
    )


class RMJob(TrainingJob):
    """Reward-model training on the shared driver."""

    name = "rm"
    script = "jobs/train_rm.py"
    task = RMTask
    exports = ("model", "official")

    def plan(self, config: RMTrainConfig) -> tuple[Schedule, RMPlan]:
        from rayapp.data import storage
        from rayapp.data.pipeline import val_split_path

        data_dir = ensure_data(config)
        plan = RMPlan(data_dir=data_dir, tokenizer=resolve_tokenizer(config, data_dir),
                      train_pairs=count_split_pairs(storage.join(data_dir, "train")),
                      val_pairs=count_split_pairs(val_split_path(data_dir)))
        if plan.tokenizer is None:
            raise ValueError("the data pipeline needs a tokenizer directory: pass tokenizer= or use a data dir "
                             "with a tokenizer/ sub-directory")
        return make_schedule(config, plan.train_pairs), plan

    def datasets(self, config: RMTrainConfig, plan: RMPlan) -> dict:
        from rayapp.data.pipeline import build_train_val_datasets

        image_size, max_length = model_geometry(config)
        datasets = build_train_val_datasets(plan.data_dir, image_size=image_size, max_length=max_length,
                                            tokenizer_dir=plan.tokenizer, shuffle_seed=config.seed)
        if should_materialize(config, plan, image_size):
            # Each pass over a lazy dataset restarts decode/preprocess actors (tens of seconds on a small host),
            # and preprocessing before the workers hold their CPUs cannot be starved by them.
            datasets = {name: ds.materialize() for name, ds in datasets.items()}
        return datasets

    def describe(self, config: RMTrainConfig, schedule: Schedule, plan: RMPlan, resources: dict) -> str:
        accum = config.gradient_accumulation_steps
        return "\n".join([
            (f"preset {config.preset}; model: {config.init or config.model_preset + ' (random init)'}, "
             f"fix_rate {config.fix_rate}"),
            f"pairs: train {plan.train_pairs}, val {plan.val_pairs}",
            (f"workers: {config.num_workers} ({'GPU' if config.use_gpu else 'CPU'}, {resources}, "
             f"{config.placement_strategy}, ZeRO-{config.zero_stage}, precision {config.precision})"),
            (f"effective batch: {config.pairs_per_update} pairs = {config.num_workers} workers x "
             f"{config.train_batch_size} pairs x {accum} accumulation"),
            (f"steps per epoch: {schedule.steps_per_epoch}; total updates: {schedule.total_steps} "
             f"({schedule.total_steps / schedule.steps_per_epoch:.2f} epochs); "
             f"validations: {len(schedule.eval_steps)}"),
            (f"optimizer: Adam lr {config.learning_rate} betas {tuple(config.adam_betas)} eps {config.adam_eps} "
             f"wd {config.weight_decay}, {config.lr_scheduler} schedule, warm-up {config.warmup_steps}, "
             f"clip {config.max_grad_norm}"),
            f"tracking: {config.tracking}; run {config.run_name} under {config.storage_path}",
        ])


def train_reward_model(config: RMTrainConfig, *, callbacks: Sequence[UpdateCallback] = (),
                       verbose: bool = False) -> RMTrainResult:
    """Train on the connected Ray cluster (or a local one); the exported model lands in config.output_dir.

    `callbacks` are called on every rank before and after each update (see rayapp.runtime.callbacks).
    """
    result = rm_result(run_training(RMJob(), config, callbacks=callbacks, verbose=verbose))
    write_run_card(result)
    return result


def write_run_card(result: RMTrainResult, extra_metrics: dict | None = None) -> None:
    """The model card (README.md) beside the exported model: the run's metrics and resolved config."""
    from rayapp.model.hub import base_model_of, write_model_card

    write_model_card(result.model_dir, metrics={**result.metrics, **(extra_metrics or {})},
                     run_config=result.config.to_dict(), base_model=base_model_of(result.config.init))


def rm_result(run: TrainingRun) -> RMTrainResult:
    out = Path(run.output_dir)
    curve = out / "loss_curve.png"
    return RMTrainResult(
        model_dir=str(out / "model"), official_dir=str(out / "official"), plan=run.plan.task_plan,
        schedule=run.plan.schedule, metrics=run.metrics, reports=run.reports,
        completed_updates=list(run.state.completed_updates), checkpoint_path=run.checkpoint_path,
        curve_png=str(curve) if curve.is_file() else None, config=run.config)
