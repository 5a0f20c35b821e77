"""The per-worker reward-model training loop (runs inside each Ray Train worker)."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import common
from .config import RMTrainConfig

BEST_WEIGHTS = "best_model.safetensors"  # best-by-val-loss weights kept inside every Ray Train checkpoint
TRAIN_COLUMNS = ("pixels_better", "pixels_worse", "input_ids", "attention_mask")


def build_model(config: RMTrainConfig, tokenizer: str | None):
    """The model to train: `init` weights if given, else a fresh `preset` (seeded, so equal on every rank)."""
    import rayapp

    if config.init:
        model = rayapp.load(config.init, device="cpu", tokenizer=tokenizer)
    else:
        model = rayapp.create_model(config.preset, tokenizer=tokenizer, seed=config.seed)
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


def evaluate(engine, shard, micro_batch: int, device) -> dict[str, float]:
    """Validation loss and pairwise accuracy over all ranks' shards (model ties count as wrong), per pair kind."""
    engine.eval()
    kinds = ("caption", "quality", "both", "human")
    # sums: loss, pairs, correct, then (pairs, correct) per kind
    sums = np.zeros(3 + 2 * len(kinds))
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=micro_batch, batch_format="numpy", drop_last=False):
            r_b, r_w = pair_rewards(engine, batch, device)
            correct = (r_b > r_w).cpu().numpy()
            sums[0] += float(-F.logsigmoid(r_b - r_w).sum())
            sums[1] += len(correct)
            sums[2] += correct.sum()
            pair_kinds = batch.get("pair_kind")
            if pair_kinds is not None:
                for k, kind in enumerate(kinds):
                    sel = pair_kinds == kind
                    sums[3 + 2 * k] += sel.sum()
                    sums[4 + 2 * k] += correct[sel].sum()
    engine.train()
    sums = common.all_reduce_sum(sums.tolist(), device)
    pairs = max(sums[1], 1.0)
    metrics = {"val_loss": sums[0] / pairs, "val_acc": sums[2] / pairs, "val_pairs": int(sums[1])}
    for k, kind in enumerate(kinds):
        if sums[3 + 2 * k]:
            metrics[f"val_acc_{kind}"] = sums[4 + 2 * k] / sums[3 + 2 * k]
    return metrics


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
    total, total_sq, count = common.all_reduce_sum([total, total_sq, float(count)], device)
    mean = total / max(count, 1.0)
    std = math.sqrt(max(total_sq / max(count, 1.0) - mean * mean, 1e-12))
    return mean, std, int(count)


class _Micro:
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


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point: build model + DeepSpeed engine, resume, train, validate, checkpoint, export."""
    import ray.train
    from ray.train.torch import get_device

    config = RMTrainConfig.from_dict(loop_config["config"])
    plan = loop_config["plan"]
    rank = ray.train.get_context().get_world_rank()
    world_size = ray.train.get_context().get_world_size()
    device = get_device()
    precision = common.resolve_precision(config.precision, config.use_gpu)

    common.quiet_report_log()
    model = build_model(config, plan["tokenizer"])
    common.seed_everything(config.seed + rank)  # after the weights: dropout and the like differ per rank
    ds_config = common.deepspeed_config(
        micro_batch=config.batch_pairs_per_worker, grad_accum=config.grad_accum, world_size=world_size,
        lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
        grad_clip=config.grad_clip, zero_stage=config.zero_stage, precision=precision)
    schedule = common.lr_lambda(plan["total_steps"], config.warmup_steps, config.schedule, config.min_lr_ratio)
    engine = common.initialize_engine(model, ds_config, lr_schedule=schedule, use_gpu=config.use_gpu)

    state = {"step": 0, "history": [], "best_val_loss": None, "best_step": None, "restarts": 0}
    best: dict[str, dict] = {}  # "weights": best-by-val-loss state dict (CPU), on every rank

    def read_best(directory: Path) -> None:
        if (directory / BEST_WEIGHTS).is_file():
            from safetensors.torch import load_file

            best["weights"] = load_file(str(directory / BEST_WEIGHTS))

    restored = common.restore_checkpoint(engine, on_directory=read_best)
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
    micro = _Micro(train_shard, config.batch_pairs_per_worker)
    spe, total = plan["steps_per_epoch"], plan["total_steps"]
    eval_steps = set(plan["eval_steps"])
    ckpt_every = config.checkpoint_every_steps
    window_loss, window_n, t_window = 0.0, 0, time.time()
    fail_marker = Path(config.storage_path) / f".{config.run_name}.failed_once" if config.fail_at_step else None

    while state["step"] < total:
        micro.new_pass(seed=config.seed + 1000 * (state["step"] // spe) + rank)
        epoch_end = min(total, (state["step"] // spe + 1) * spe)
        while state["step"] < epoch_end:
            step = state["step"]
            if config.fail_at_step == step and rank == 1 and not fail_marker.exists():
                fail_marker.touch()
                os._exit(1)  # test knob: a hard worker death, as a lost node or an OOM kill would be
            batches = micro.take(config.grad_accum)
            if not common.all_ranks_agree(batches is not None, device):
                # Equal shards make this unreachable; every rank raises together rather than deadlock.
                raise RuntimeError(f"a train shard ran out of data at update {step} "
                                   f"(planned {spe} updates per epoch)")
            step_loss = 0.0
            for batch in batches:
                loss = pair_loss(*pair_rewards(engine, batch, device))
                engine.backward(loss)
                engine.step()  # DeepSpeed only updates at the accumulation boundary
                step_loss += float(loss) / config.grad_accum
            state["step"] = step + 1
            state["history"].append(step)
            window_loss, window_n = window_loss + step_loss, window_n + 1
            if rank == 0 and config.step_log:
                with open(config.step_log, "a") as log:
                    log.write(f"{os.getpid()} {step}\n")

            done = state["step"]
            at_epoch_end = done == epoch_end
            do_eval = done in eval_steps
            do_ckpt = at_epoch_end or (ckpt_every and done % ckpt_every == 0)
            do_log = do_eval or do_ckpt or (config.log_every_steps and done % config.log_every_steps == 0)
            if not do_log:
                continue
            loss_sum, rank_steps = common.all_reduce_sum([window_loss, float(window_n)], device)
            elapsed = time.time() - t_window
            metrics = {
                "step": done, "epoch": done / spe, "train_loss": loss_sum / max(rank_steps, 1.0),
                "lr": engine.get_lr()[0],
                "pairs_per_s": window_n * config.pairs_per_update / max(elapsed, 1e-9),
                "restarts": state["restarts"],
            }
            if do_eval:
                metrics.update(evaluate(engine, val_shard, config.batch_pairs_per_worker, device))
                if state["best_val_loss"] is None or metrics["val_loss"] < state["best_val_loss"]:
                    state["best_val_loss"], state["best_step"] = metrics["val_loss"], done
                    best["weights"] = common.full_state_dict(engine)
                metrics["best_val_loss"] = state["best_val_loss"]
            if rank == 0:
                print(progress_line(metrics, total), flush=True)
            if do_ckpt:
                common.report(metrics, engine=engine, state=state, extra=write_best)
            else:
                common.report(metrics)
            window_loss, window_n, t_window = 0.0, 0, time.time()

    _finish(engine, config, plan, state, best, train_shard, device)


def progress_line(metrics: dict, total_steps: int) -> str:
    """One line of training progress: update, epoch, losses, validation accuracy, throughput."""
    parts = [f"[train] update {metrics['step']}/{total_steps}", f"epoch {metrics['epoch']:.2f}",
             f"train loss {metrics['train_loss']:.4f}", f"lr {metrics['lr']:.2e}",
             f"{metrics['pairs_per_s']:.0f} pairs/s"]
    if "val_loss" in metrics:
        parts += [f"val loss {metrics['val_loss']:.4f}", f"val acc {metrics['val_acc']:.3f}"]
    return "  ".join(parts)


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
    import tempfile

    import ray.train

    if "weights" in best:
        common.load_full_state_dict(engine, best["weights"])
    mean, std, count = raw_output_stats(engine, train_shard, config.batch_pairs_per_worker, device)
    state["finished"] = True
    state["reward_mean"], state["reward_std"] = mean, std
    state["steps_per_epoch"] = plan["steps_per_epoch"]
    # Collective under ZeRO-3 (gathers partitions), so every rank takes part; unneeded otherwise.
    weights = common.full_state_dict(engine) if engine.zero_optimization_stage() == 3 else None
    metrics = {**_final_metrics(state, plan["steps_per_epoch"]), "stat_images": count}

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
        if ray.train.get_context().get_world_rank() == 0:
            export(Path(tmp))
            import json

            (Path(tmp) / common.STATE_FILE).write_text(json.dumps(state))
        # Every rank reports (it is a barrier); only rank 0 carries the export.
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if ray.train.get_context().get_world_rank() == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)
