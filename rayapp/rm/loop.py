"""The per-worker reward-model training loop (runs inside each Ray Train worker)."""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rayapp.runtime import checkpoints, cluster
from rayapp.runtime import engine as rt
from rayapp.runtime.callbacks import notify

from .config import RMTrainConfig
from .evaluation import PairAccuracy

logger = logging.getLogger(__name__)

BEST_WEIGHTS = "best_model.safetensors"  # best-by-val-loss weights kept inside every Ray Train checkpoint


def build_model(config: RMTrainConfig, tokenizer: str | None):
    """The model to train: `init` weights if given, else a fresh `model_preset` (seeded: equal on every rank)."""
    import rayapp

    if config.init:
        model = rayapp.load(config.init, device="cpu", tokenizer=tokenizer)
    else:
        model = rayapp.create_model(config.model_preset, tokenizer=tokenizer, seed=config.seed)
    model.train()
    model.freeze_fix_rate(config.fix_rate)
    return model


def pair_rewards(engine, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards of the better and the worse image of each pair, both halves in one forward pass."""
    better = torch.as_tensor(batch["pixels_better"])
    worse = torch.as_tensor(batch["pixels_worse"])
    ids = torch.as_tensor(batch["input_ids"]).long()
    mask = torch.as_tensor(batch["attention_mask"]).long()
    raw = engine(torch.cat([better, worse]).to(device), ids.repeat(2, 1).to(device), mask.repeat(2, 1).to(device))
    n = better.shape[0]
    return raw[:n].float(), raw[n:].float()


def pair_loss(r_better: torch.Tensor, r_worse: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_better - r_worse), mean over pairs."""
    return -F.logsigmoid(r_better - r_worse).mean()


def validate(engine, shard, micro_batch: int, device) -> dict[str, float]:
    """Validation loss and pairwise accuracy over all ranks' shards (model ties count as wrong), per pair kind."""
    engine.eval()
    tally = PairAccuracy()
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=micro_batch, batch_format="numpy", drop_last=False):
            tally.add(*pair_rewards(engine, batch, device), batch.get("pair_kind"))
    engine.train()
    tally.sums = np.asarray(rt.all_reduce_sum(tally.sums.tolist(), device))
    return tally.metrics(prefix="val_")


def raw_output_stats(engine, shard, micro_batch: int, device) -> tuple[float, float, int]:
    """Mean and std of the raw head output over every image in all ranks' shards (each pair's two images)."""
    engine.eval()
    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=micro_batch, batch_format="numpy", drop_last=False):
            r_b, r_w = pair_rewards(engine, batch, device)
            raw = torch.cat([r_b, r_w]).double()
            total += float(raw.sum())
            total_sq += float((raw * raw).sum())
            count += raw.numel()
    total, total_sq, count = rt.all_reduce_sum([total, total_sq, float(count)], device)
    mean = total / max(count, 1.0)
    std = math.sqrt(max(total_sq / max(count, 1.0) - mean * mean, 1e-12))
    return mean, std, int(count)


class MicroBatches:
    """Pulls micro-batches from a dataset shard, one epoch pass at a time."""

    def __init__(self, shard, micro_batch: int):
        self.shard, self.micro_batch, self.it = shard, micro_batch, None

    def new_pass(self, seed: int) -> None:
        # Ray Data's order is not reproducible across worker groups, so a resumed epoch takes its remaining
        # updates from a fresh pass: the update count is exact, the sample set of that epoch approximately so.
        # The pipeline's seeded shuffle repeats every epoch; the local shuffle buffer varies the batches.
        self.it = iter(self.shard.iter_batches(
            batch_size=self.micro_batch, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=max(8 * self.micro_batch, 64), local_shuffle_seed=seed))

    def take(self, n: int) -> list[dict] | None:
        out = []
        for _ in range(n):
            batch = next(self.it, None)
            if batch is None:
                return None
            out.append(batch)
        return out


def progress_line(metrics: dict, total_steps: int) -> str:
    """One line of training progress: update, epoch, losses, validation accuracy, throughput."""
    parts = [f"[train] update {metrics['step']}/{total_steps}", f"epoch {metrics['epoch']:.2f}",
             f"train loss {metrics['train_loss']:.4f}", f"lr {metrics['lr']:.2e}",
             f"{metrics['pairs_per_s']:.0f} pairs/s"]
    if "val_loss" in metrics:
        parts += [f"val loss {metrics['val_loss']:.4f}", f"val acc {metrics['val_acc']:.3f}"]
    return "  ".join(parts)


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point: build model + DeepSpeed engine, resume, train, validate, checkpoint, export."""
    import ray.train
    from ray.train.torch import get_device

    from rayapp.logs import setup_logging

    setup_logging(verbose=loop_config.get("verbose", False))
    cluster.quiet_report_log()
    config = RMTrainConfig.from_dict(loop_config["config"])
    plan, callbacks = loop_config["plan"], loop_config.get("callbacks", ())
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = get_device()
    precision = rt.resolve_precision(config.precision, config.use_gpu)
    cluster.log_worker_nodes()

    model = build_model(config, plan["tokenizer"])
    rt.seed_everything(config.seed + rank)  # after the weights: dropout and the like differ per rank
    engine = rt.initialize_engine(model, config, total_steps=plan["total_steps"], world_size=world_size,
                                  precision=precision, optimizer="Adam")

    state = {"step": 0, "completed_updates": [], "best_val_loss": None, "best_step": None, "restarts": 0}
    best: dict[str, dict] = {}  # "weights": best-by-val-loss state dict (CPU), on every rank

    def read_best(directory: Path) -> None:
        if (directory / BEST_WEIGHTS).is_file():
            from safetensors.torch import load_file

            best["weights"] = load_file(str(directory / BEST_WEIGHTS))

    restored = checkpoints.restore_checkpoint(engine, resume_from=config.resume_from, on_directory=read_best)
    if restored is not None:
        state = restored
        state["restarts"] += 1
    if state.get("finished"):
        _reregister_export(state, rank)
        return

    def write_best(directory: Path) -> None:
        if "weights" in best:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in best["weights"].items()}, str(directory / BEST_WEIGHTS))

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    micro = MicroBatches(train_shard, config.train_batch_size)
    per_epoch, total = plan["steps_per_epoch"], plan["total_steps"]
    eval_steps = set(plan["eval_steps"])
    storage = context.get_storage()
    hook_args = (storage.storage_fs_path, storage.experiment_dir_name)
    window_loss, window_n, t_window = 0.0, 0, time.time()

    while state["step"] < total:
        micro.new_pass(seed=config.seed + 1000 * (state["step"] // per_epoch) + rank)
        epoch_end = min(total, (state["step"] // per_epoch + 1) * per_epoch)
        while state["step"] < epoch_end:
            step = state["step"]
            notify(callbacks, "before", step, rank, *hook_args)
            batches = micro.take(config.gradient_accumulation_steps)
            if not rt.all_ranks_agree(batches is not None, device):
                # Equal shards make this unreachable; every rank raises together rather than deadlock.
                raise RuntimeError(f"a train shard ran out of data at update {step} "
                                   f"(planned {per_epoch} updates per epoch)")
            step_loss = 0.0
            for batch in batches:
                loss = pair_loss(*pair_rewards(engine, batch, device))
                engine.backward(loss)
                engine.step()  # DeepSpeed only updates at the accumulation boundary
                step_loss += float(loss) / config.gradient_accumulation_steps
            state["step"] = step + 1
            state["completed_updates"].append(step)
            window_loss, window_n = window_loss + step_loss, window_n + 1
            notify(callbacks, "after", step, rank, *hook_args)

            done = state["step"]
            do_eval = done in eval_steps
            do_checkpoint = done == epoch_end or (config.checkpoint_every and done % config.checkpoint_every == 0)
            if not (do_eval or do_checkpoint or (config.log_every and done % config.log_every == 0)):
                continue
            loss_sum, rank_steps = rt.all_reduce_sum([window_loss, float(window_n)], device)
            elapsed = time.time() - t_window
            metrics = {
                "step": done, "epoch": done / per_epoch, "train_loss": loss_sum / max(rank_steps, 1.0),
                "lr": engine.get_lr()[0],
                "pairs_per_s": window_n * config.pairs_per_update / max(elapsed, 1e-9),
                "restarts": state["restarts"],
            }
            if do_eval:
                metrics.update(validate(engine, val_shard, config.train_batch_size, device))
                if state["best_val_loss"] is None or metrics["val_loss"] < state["best_val_loss"]:
                    state["best_val_loss"], state["best_step"] = metrics["val_loss"], done
                    best["weights"] = rt.full_state_dict(engine)
                metrics["best_val_loss"] = state["best_val_loss"]
            if rank == 0:
                logger.info(progress_line(metrics, total))
            if do_checkpoint:
                checkpoints.report(metrics, engine=engine, state=state, extra=write_best)
            else:
                checkpoints.report(metrics)
            window_loss, window_n, t_window = 0.0, 0, time.time()

    _finish(engine, config, plan, state, best, train_shard, device)


def _final_metrics(state: dict, steps_per_epoch: int) -> dict:
    return {"step": state["step"], "epoch": state["step"] / steps_per_epoch, "finished": True,
            "reward_mean": state["reward_mean"], "reward_std": state["reward_std"],
            "best_val_loss": state["best_val_loss"], "best_step": state["best_step"]}


def _reregister_export(state: dict, rank: int) -> None:
    """A restart found the final export already persisted: make sure Ray Train's result points at it."""
    import ray.train

    registered = ray.train.get_checkpoint()
    if registered is not None and registered.path == state["checkpoint_path"]:
        return
    checkpoint = None
    if rank == 0:
        filesystem = ray.train.get_context().get_storage().storage_filesystem
        checkpoint = ray.train.Checkpoint(state["checkpoint_path"], filesystem=filesystem)
    ray.train.report(_final_metrics(state, state["steps_per_epoch"]), checkpoint=checkpoint)


def _finish(engine, config: RMTrainConfig, plan: dict, state: dict, best: dict, train_shard, device) -> None:
    """Load the best weights, measure the raw-output mean/std on training data, export both formats."""
    import json

    import ray.train

    if "weights" in best:
        rt.load_full_state_dict(engine, best["weights"])
    mean, std, count = raw_output_stats(engine, train_shard, config.train_batch_size, device)
    state["finished"] = True
    state["reward_mean"], state["reward_std"] = mean, std
    state["steps_per_epoch"] = plan["steps_per_epoch"]
    # Collective under ZeRO-3 (gathers partitions), so every rank takes part; unneeded otherwise.
    weights = rt.full_state_dict(engine) if engine.zero_optimization_stage() == 3 else None
    metrics = {**_final_metrics(state, plan["steps_per_epoch"]), "stat_images": count}
    rank = ray.train.get_context().get_world_rank()

    def export(directory: Path) -> None:
        if engine.zero_optimization_stage() == 3:
            model = build_model(config, plan["tokenizer"])  # ZeRO-3 modules hold only a partition
            model.load_state_dict(weights)
        else:
            model = engine.module
        model.config.reward_mean, model.config.reward_std = mean, std
        model.eval()
        model.save_pretrained(directory / "model")
        model.export_official(directory / "official")

    with tempfile.TemporaryDirectory(prefix="rayapp-final-") as tmp:
        if rank == 0:
            export(Path(tmp))
            (Path(tmp) / checkpoints.STATE_FILE).write_text(json.dumps(state))
        # Every rank reports (it is a barrier); only rank 0 carries the export.
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)
