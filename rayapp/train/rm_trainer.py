"""Driver side of reward-model training: data, the step plan, the Ray Train `TorchTrainer`, the exported model."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import RMTrainConfig


@dataclass
class RMTrainResult:
    """What a finished run produced."""

    model_dir: str  # save_pretrained directory (config.json with reward_mean/std, weights, tokenizer)
    official_dir: str  # ImageReward.pt + med_config.json
    plan: dict  # derived quantities (pairs, steps per epoch, ...)
    metrics: dict  # last reported metrics (rank 0)
    history: list[dict] = field(default_factory=list)  # every report, in order
    checkpoint_path: str | None = None  # the Ray Train checkpoint holding the export


def count_split_pairs(path: str | Path) -> int:
    """Unequal-rank pairs in a Parquet shard dir, from the ranking column only (no image bytes read)."""
    import pyarrow.parquet as pq

    from rayapp.data.pairs import count_pairs
    from rayapp.data.shards import parquet_files

    total = 0
    for file in parquet_files(path):
        for ranking in pq.read_table(file, columns=["ranking"]).column("ranking").to_pylist():
            total += count_pairs(ranking)
    return total


def ensure_data(config: RMTrainConfig) -> Path:
    """The data dir to train on; synthesises the offline default set when none is configured."""
    if config.data_dir:
        return Path(config.data_dir)
    from rayapp.data.synth import write_synthetic_set

    out = Path(config.output_dir) / "data"
    if not (out / "synth.json").is_file():
        write_synthetic_set(out, prompts=config.synth_prompts, per_prompt=config.synth_per_prompt,
                            seed=config.seed, overwrite=True, progress=False)
    return out


def resolve_tokenizer(config: RMTrainConfig, data_dir: Path) -> str | None:
    """Tokenizer for the model and the pipeline: explicit, else the data set's own, else the init model's."""
    if config.tokenizer:
        return config.tokenizer
    if (data_dir / "tokenizer").is_dir():
        return str((data_dir / "tokenizer").resolve())
    return None


def make_plan(config: RMTrainConfig, train_pairs: int, val_pairs: int) -> dict:
    """Steps per epoch, total updates, when to validate; every rank follows this same plan.

    Ray Train splits the training pairs equally (the remainder is dropped), each worker drops its last
    incomplete micro-batch, and an update takes grad_accum micro-batches.
    """
    per_worker = train_pairs // config.num_workers
    micro_batches = per_worker // config.batch_pairs_per_worker
    steps_per_epoch = micro_batches // config.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"{train_pairs} training pairs are too few for {config.num_workers} workers x "
            f"{config.batch_pairs_per_worker} pairs x {config.grad_accum} accumulation")
    total = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    if config.eval_every_steps > 0:
        eval_steps = list(range(config.eval_every_steps, total + 1, config.eval_every_steps))
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
        "pairs_per_worker_per_epoch": micro_batches * config.batch_pairs_per_worker,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "epochs": total / steps_per_epoch,
        "effective_batch_pairs": config.pairs_per_update,
        "workers": config.num_workers,
        "eval_steps": eval_steps,
    }


def describe_plan(config: RMTrainConfig, plan: dict) -> str:
    """Human-readable summary of the derived quantities, printed at the start of a job."""
    return "\n".join([
        f"model: {config.init or 'preset ' + config.preset + ' (random init)'}, fix_rate {config.fix_rate}",
        f"pairs: train {plan['train_pairs']}, val {plan['val_pairs']}",
        (f"workers: {plan['workers']} ({'GPU' if config.use_gpu else 'CPU'}, ZeRO-{config.zero_stage}, "
         f"precision {config.precision})"),
        (f"effective batch: {plan['effective_batch_pairs']} pairs = {config.num_workers} workers x "
         f"{config.batch_pairs_per_worker} pairs x {config.grad_accum} accumulation"),
        (f"steps per epoch: {plan['steps_per_epoch']}; total updates: {plan['total_steps']} "
         f"({plan['epochs']:.2f} epochs); validations: {len(plan['eval_steps'])}"),
        (f"optimizer: Adam lr {config.lr} betas {tuple(config.betas)} eps {config.eps} wd {config.weight_decay}, "
         f"{config.schedule} schedule, warm-up {config.warmup_steps}, clip {config.grad_clip}"),
    ])


def prepare(config: RMTrainConfig) -> tuple[RMTrainConfig, Path, str | None, dict]:
    """Resolve defaults, make / find the data, count pairs and plan. Returns (config, data_dir, tokenizer, plan)."""
    config = config.resolved()
    config.validate()
    data_dir = ensure_data(config)
    tokenizer = resolve_tokenizer(config, data_dir)
    plan = make_plan(config, count_split_pairs(data_dir / "train"), count_split_pairs(data_dir / "val"))
    plan["tokenizer"] = tokenizer
    plan["data_dir"] = str(data_dir.resolve())
    return config, data_dir, tokenizer, plan


def model_geometry(config: RMTrainConfig, tokenizer: str | None) -> tuple[int, int]:
    """(image_size, max_length) of the model to train, without building it."""
    if config.init:
        import rayapp

        model = rayapp.load(config.init, device="cpu", tokenizer=tokenizer)
        return model.config.image_size, model.config.max_length
    from rayapp.model.config import get_preset

    preset = get_preset(config.preset)
    return preset.image_size, preset.max_length


def should_materialize(config: RMTrainConfig, plan: dict, image_size: int) -> bool:
    """Whether to keep the preprocessed pairs in the object store (see RMTrainConfig.materialize)."""
    if config.materialize != "auto":
        return config.materialize == "yes"
    pair_bytes = 2 * 3 * image_size * image_size * 4
    return (plan["train_pairs"] + plan["val_pairs"]) * pair_bytes <= config.materialize_max_gib * 2**30


def build_trainer(config: RMTrainConfig, data_dir: Path, tokenizer: str | None, plan: dict):
    """The `TorchTrainer` (not started): datasets from the Ray Data pair pipeline, failure/checkpoint policy."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rayapp.data.pipeline import build_train_val_datasets

    from .rm_loop import train_loop

    if tokenizer is None or not Path(tokenizer).is_dir():
        raise ValueError("the data pipeline needs a tokenizer directory: pass tokenizer= or use a data dir "
                         "with a tokenizer/ sub-directory")
    image_size, max_length = model_geometry(config, tokenizer)
    datasets = build_train_val_datasets(data_dir, image_size=image_size, max_length=max_length,
                                        tokenizer_dir=tokenizer, shuffle_seed=config.seed)
    if should_materialize(config, plan, image_size):
        # Each pass over a lazy dataset restarts decode/preprocess actors (tens of seconds on a small host);
        # a small set is cheaper kept preprocessed in the object store (spread over the cluster's nodes).
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "plan": plan},
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=config.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_to_keep),
        ),
        datasets=datasets,
    )


def train_reward_model(config: RMTrainConfig, *, log=print) -> RMTrainResult:
    """Run the whole training on the connected Ray cluster; the exported model lands in config.output_dir."""
    config, data_dir, tokenizer, plan = prepare(config)
    log(describe_plan(config, plan))
    trainer = build_trainer(config, data_dir, tokenizer, plan)
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
    history = []
    frame = getattr(result, "metrics_dataframe", None)
    if frame is not None:
        history = json.loads(frame.to_json(orient="records"))
    summary = {"config": config.to_dict(), "plan": plan, "metrics": result.metrics, "history": history,
               "checkpoint": result.checkpoint.path}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return RMTrainResult(str(out / "model"), str(out / "official"), plan, dict(result.metrics or {}), history,
                         result.checkpoint.path)
