"""Driver side of reward-model training: data, the update plan, the Ray Train `TorchTrainer`, the exported model.

Entry point: `train_reward_model(config)` (what `jobs/train_rm.py` and the tests call).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from rayapp.runtime import checkpoints, cluster
from rayapp.runtime.callbacks import UpdateCallback

from .config import RMTrainConfig

logger = logging.getLogger(__name__)


@dataclass
class RMTrainResult:
    """What a finished run produced."""

    model_dir: str  # save_pretrained directory (config.json with reward_mean/std, weights, tokenizer)
    official_dir: str  # ImageReward.pt + med_config.json
    plan: dict  # derived quantities (pairs, updates per epoch, ...)
    metrics: dict  # last reported metrics (rank 0)
    reports: list[dict] = field(default_factory=list)  # every metrics report, in order
    checkpoint_path: str | None = None  # the Ray Train checkpoint holding the export
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


def make_plan(config: RMTrainConfig, train_pairs: int, val_pairs: int) -> dict:
    """Updates per epoch, total updates, when to validate; every rank follows this same plan.

    Ray Train splits the training pairs equally (the remainder is dropped), each worker drops its last
    incomplete micro-batch, and an update takes gradient_accumulation_steps micro-batches.
    """
    per_worker = train_pairs // config.num_workers
    micro_batches = per_worker // config.train_batch_size
    steps_per_epoch = micro_batches // config.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"{train_pairs} training pairs are too few for {config.num_workers} workers x "
            f"{config.train_batch_size} pairs x {config.gradient_accumulation_steps} accumulation")
    total = config.max_steps if config.max_steps is not None else config.num_epochs * steps_per_epoch
    if config.eval_every > 0:
        eval_steps = list(range(config.eval_every, total + 1, config.eval_every))
    else:
        per_epoch = max(1, min(config.evals_per_epoch, steps_per_epoch))
        eval_steps = [e * steps_per_epoch + round(k * steps_per_epoch / per_epoch)
                      for e in range((total + steps_per_epoch - 1) // steps_per_epoch)
                      for k in range(1, per_epoch + 1)]
    epoch_ends = set(range(steps_per_epoch, total + 1, steps_per_epoch))
    # Every epoch end and the last update are always validated.
    eval_steps = sorted({s for s in eval_steps if s <= total} | epoch_ends | {total})
    return {
        "train_pairs": train_pairs,
        "val_pairs": val_pairs,
        "pairs_per_worker_per_epoch": micro_batches * config.train_batch_size,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "epochs": total / steps_per_epoch,
        "effective_batch_pairs": config.pairs_per_update,
        "workers": config.num_workers,
        "eval_steps": eval_steps,
    }


def describe_plan(config: RMTrainConfig, plan: dict) -> str:
    """Human-readable summary of the derived quantities, logged at the start of a run."""
    accum = config.gradient_accumulation_steps
    return "\n".join([
        (f"preset {config.preset}; model: {config.init or config.model_preset + ' (random init)'}, "
         f"fix_rate {config.fix_rate}"),
        f"pairs: train {plan['train_pairs']}, val {plan['val_pairs']}",
        (f"workers: {plan['workers']} ({'GPU' if config.use_gpu else 'CPU'}, {plan.get('worker_resources')}, "
         f"{config.placement_strategy}, ZeRO-{config.zero_stage}, precision {config.precision})"),
        (f"effective batch: {plan['effective_batch_pairs']} pairs = {config.num_workers} workers x "
         f"{config.train_batch_size} pairs x {accum} accumulation"),
        (f"steps per epoch: {plan['steps_per_epoch']}; total updates: {plan['total_steps']} "
         f"({plan['epochs']:.2f} epochs); validations: {len(plan['eval_steps'])}"),
        (f"optimizer: Adam lr {config.learning_rate} betas {tuple(config.adam_betas)} eps {config.adam_eps} "
         f"wd {config.weight_decay}, {config.lr_scheduler} schedule, warm-up {config.warmup_steps}, "
         f"clip {config.max_grad_norm}"),
    ])


def resolve(config: RMTrainConfig) -> RMTrainConfig:
    """Fill the run-dependent fields: absolute output dir, storage path and run name."""
    output_dir = str(Path(config.output_dir).resolve())
    return replace(
        config, output_dir=output_dir,
        storage_path=config.storage_path or str(Path(output_dir) / "ray"),
        run_name=config.run_name or time.strftime("rm-%Y%m%d-%H%M%S"))


def prepare(config: RMTrainConfig) -> tuple[RMTrainConfig, str, str | None, dict]:
    """Validate, size the workers, make / find the data, count pairs and plan (needs a connected Ray).

    Returns (config, data_dir, tokenizer, plan)."""
    config = resolve(config)
    config.validate()
    resources = cluster.worker_resources(config, "jobs/train_rm.py")  # fails fast, before any data work
    data_dir = ensure_data(config)
    tokenizer = resolve_tokenizer(config, data_dir)
    from rayapp.data import storage
    from rayapp.data.pipeline import val_split_path

    plan = make_plan(config, count_split_pairs(storage.join(data_dir, "train")),
                     count_split_pairs(val_split_path(data_dir)))
    plan["tokenizer"] = tokenizer
    plan["data_dir"] = data_dir
    plan["worker_resources"] = resources
    return config, data_dir, tokenizer, plan


def model_geometry(config: RMTrainConfig) -> tuple[int, int]:
    """(image_size, max_length) of the model to train, without building it or reading its weights."""
    if config.init:
        from rayapp.model.loading import load_config

        init = load_config(config.init)
        return init.image_size, init.max_length
    from rayapp.model.config import get_preset

    preset = get_preset(config.model_preset)
    return preset.image_size, preset.max_length


def should_materialize(config: RMTrainConfig, plan: dict, image_size: int) -> bool:
    """Whether to keep the preprocessed pairs in the object store (see RMTrainConfig.materialize)."""
    if config.materialize != "auto":
        return config.materialize == "yes"
    pair_bytes = 2 * 3 * image_size * image_size * 4
    return (plan["train_pairs"] + plan["val_pairs"]) * pair_bytes <= config.materialize_max_gib * 2**30


def build_trainer(config: RMTrainConfig, data_dir: str, tokenizer: str | None, plan: dict, *,
                  callbacks: Sequence[UpdateCallback] = (), verbose: bool = False):
    """The `TorchTrainer` (not started): workers sized to the cluster, the Ray Data pair pipeline, policies."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rayapp.data.pipeline import build_train_val_datasets

    from .loop import train_loop

    if tokenizer is None:
        raise ValueError("the data pipeline needs a tokenizer directory: pass tokenizer= or use a data dir "
                         "with a tokenizer/ sub-directory")
    image_size, max_length = model_geometry(config)
    datasets = build_train_val_datasets(data_dir, image_size=image_size, max_length=max_length,
                                        tokenizer_dir=tokenizer, shuffle_seed=config.seed)
    if should_materialize(config, plan, image_size):
        # Each pass over a lazy dataset restarts decode/preprocess actors (tens of seconds on a small host),
        # and preprocessing before the workers hold their CPUs cannot be starved by them.
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "plan": plan, "callbacks": list(callbacks),
                           "verbose": verbose},
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                               resources_per_worker=plan["worker_resources"],
                                               placement_strategy=config.placement_strategy),
        run_config=checkpoints.run_config(config, verbose=verbose),
        datasets=datasets,
    )


def train_reward_model(config: RMTrainConfig, *, callbacks: Sequence[UpdateCallback] = (),
                       verbose: bool = False) -> RMTrainResult:
    """Train on the connected Ray cluster (or a local one); the exported model lands in config.output_dir.

    `callbacks` are called on every rank before and after each update (see rayapp.runtime.callbacks).
    """
    cluster.connect(verbose)
    if not verbose:
        cluster.quiet_data_progress_bars()
    config, data_dir, tokenizer, plan = prepare(config)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    config.save(Path(config.output_dir) / "config.json")
    trainer = build_trainer(config, data_dir, tokenizer, plan, callbacks=callbacks, verbose=verbose)
    logger.info(describe_plan(config, plan))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return collect_result(config, plan, result)


def collect_result(config: RMTrainConfig, plan: dict, result) -> RMTrainResult:
    """Copy the export out of the final Ray Train checkpoint into output_dir and write summary.json."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        for name in ("model", "official"):
            if not (Path(directory) / name).is_dir():
                raise RuntimeError(f"the final checkpoint {result.checkpoint.path} has no {name}/ export")
            shutil.rmtree(out / name, ignore_errors=True)
            shutil.copytree(Path(directory) / name, out / name)
    reports = []
    frame = getattr(result, "metrics_dataframe", None)
    if frame is not None:
        reports = json.loads(frame.to_json(orient="records"))
    summary = {"config": config.to_dict(), "plan": plan, "metrics": result.metrics, "reports": reports,
               "checkpoint": result.checkpoint.path}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return RMTrainResult(str(out / "model"), str(out / "official"), plan, dict(result.metrics or {}), reports,
                         result.checkpoint.path, config)
