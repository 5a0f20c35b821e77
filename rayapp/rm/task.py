"""Reward-model training's part of the one loop (runs inside each Ray Train worker): the model, the
Bradley-Terry micro-step over comparison pairs, validation with best-by-val-loss weights, the exports."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rayapp.runtime import engine as rt
from rayapp.runtime.loop import LoopState, TrainingTask

from .config import RMTrainConfig
from .evaluation import PairAccuracy

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
    # torch.tensor copies: Ray Data's numpy batches can be read-only views of Arrow buffers.
    better = torch.tensor(batch["pixels_better"])
    worse = torch.tensor(batch["pixels_worse"])
    ids = torch.tensor(batch["input_ids"]).long()
    mask = torch.tensor(batch["attention_mask"]).long()
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


@dataclass(frozen=True)
class RMPlan:
    """What the driver found out for the workers."""

    data_dir: str  # dir or URI with train/ val/ (test/) Parquet comparison shards
    tokenizer: str | None  # tokenizer dir of the model and the pipeline
    train_pairs: int  # unequal-rank pairs in train/
    val_pairs: int  # ... in val/


class RMTask(TrainingTask):
    """Reward-model training: Adam on the pair loss, validation per pair kind, the best weights exported."""

    optimizer = "Adam"  # the reference trains the RM with plain Adam

    def __init__(self, worker, plan: RMPlan):
        super().__init__(worker, plan)
        self.config: RMTrainConfig = worker.config
        self.best_weights: dict | None = None  # best-by-val-loss state dict (CPU), on every rank
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.batches: MicroBatches | None = None
        self.pending: list[dict] = []

    def build_model(self):
        return build_model(self.config, self.plan.tokenizer)

    def attach(self, engine) -> None:
        self.engine = engine

    def micro_step(self, engine, step, micro):
        import ray.train

        config, per_epoch = self.config, self.worker.schedule.steps_per_epoch
        if self.batches is None:
            self.batches = MicroBatches(ray.train.get_dataset_shard("train"), config.train_batch_size)
        if micro == 0:
            if self.batches.it is None or step % per_epoch == 0:
                self.batches.new_pass(seed=config.seed + 1000 * (step // per_epoch) + self.worker.rank)
            taken = self.batches.take(config.gradient_accumulation_steps)
            if not rt.all_ranks_agree(taken is not None, self.worker.device):
                # Equal shards make this unreachable; every rank raises together rather than deadlock.
                raise RuntimeError(f"a train shard ran out of data at update {step} "
                                   f"(planned {per_epoch} updates per epoch)")
            self.pending = taken
        loss = pair_loss(*pair_rewards(engine, self.pending[micro], self.worker.device))
        return loss, {"loss": float(loss.detach())}

    def evaluate(self, engine, step):
        import ray.train

        metrics = validate(engine, ray.train.get_dataset_shard("val"), self.config.train_batch_size,
                           self.worker.device)
        if self.best_val_loss is None or metrics["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.best_step = metrics["val_loss"], step
            self.best_weights = rt.full_state_dict(engine)
        metrics["best_val_loss"] = self.best_val_loss
        return metrics

    def finalize(self, engine, state: LoopState) -> dict:
        """Load the best weights and measure the raw-output mean/std on training data (the normalisation)."""
        import ray.train

        if self.best_weights is not None:
            rt.load_full_state_dict(engine, self.best_weights)
        mean, std, count = raw_output_stats(engine, ray.train.get_dataset_shard("train"),
                                            self.config.train_batch_size, self.worker.device)
        self.reward_mean, self.reward_std = mean, std
        # Collective under ZeRO-3 (gathers partitions), so every rank takes part; unneeded otherwise.
        self.export_weights = rt.full_state_dict(engine) if engine.zero_optimization_stage() == 3 else None
        return {"reward_mean": mean, "reward_std": std, "stat_images": count,
                "best_val_loss": self.best_val_loss, "best_step": self.best_step}

    def export(self, directory: Path) -> None:
        if self.export_weights is not None:
            model = build_model(self.config, self.plan.tokenizer)  # ZeRO-3 modules hold only a partition
            model.load_state_dict(self.export_weights)
        else:
            model = self.engine.module
        model.config.reward_mean, model.config.reward_std = self.reward_mean, self.reward_std
        model.eval()
        model.save_pretrained(directory / "model")
        model.export_official(directory / "official")

    def save_files(self, directory: Path) -> None:
        if self.best_weights is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.best_weights.items()}, str(directory / BEST_WEIGHTS))

    def load_files(self, directory: Path) -> None:
        if (directory / BEST_WEIGHTS).is_file():
            from safetensors.torch import load_file

            self.best_weights = load_file(str(directory / BEST_WEIGHTS))

    def state_dict(self) -> dict:
        return {"best_val_loss": self.best_val_loss, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_val_loss, self.best_step = state.get("best_val_loss"), state.get("best_step")

    def curves(self, state: LoopState, directory: Path) -> list[Path]:
        from .viz import loss_accuracy_curve

        return [loss_accuracy_curve(state.reports, directory / "loss_curve.png")]
