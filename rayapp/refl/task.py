"""ReFL's part of the one loop (runs inside each Ray Train worker): the diffusion parts and the reward model,
the reward / pre-training micro-step, held-out evaluation with grids, EMA, the exported pipeline or LoRA."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from rayapp.runtime import engine as rt
from rayapp.runtime.loop import LoopState, TrainingTask

from .config import ReFLConfig
from .evaluation import evaluate_held_out
from .models import load_diffusion_parts, load_reward_model, prepare_unet_for_training, save_final_model
from .objective import pretrain_loss_step, reward_loss_step

logger = logging.getLogger(__name__)

EMA_FILE = "ema.pt"  # EMA shadow weights beside DeepSpeed's files (tensors and numbers only)
PLAN_KEYS = ("grad_index", "grad_steps", "grad_timestep")  # a micro-batch's gradient plan (AlignProp: K)


def update_kinds(cfg: ReFLConfig, step: int) -> tuple[bool, bool]:
    """(use the reward loss, use the pre-training loss) for 0-based update `step`."""
    if not cfg.pretrain_enabled:
        return True, False
    hit = step % cfg.pretrain_every == 0
    if cfg.pretrain_mode == "joint":
        return True, hit
    return (not hit), hit


class ReFLTask(TrainingTask):
    """ReFL of a diffusion pipeline's denoiser against a (weighted) reward."""

    optimizer = "AdamW"

    def __init__(self, worker, plan=None):
        super().__init__(worker, plan)
        self.cfg: ReFLConfig = worker.config
        self.trains_frozen_subset = self.cfg.lora_rank > 0
        self.ema = None
        self.grids: dict[str, bytes] = {}  # eval grid PNGs by file name, carried in every checkpoint
        self.prompt_batches = self.pretrain_batches = None

    def build_model(self):
        device, dtype = self.worker.device, rt.precision_dtype(self.worker.precision)
        torch.manual_seed(self.cfg.seed + self.worker.rank)
        self.parts = load_diffusion_parts(self.cfg, device, dtype)
        self.reward = load_reward_model(self.cfg, device, dtype)
        return prepare_unet_for_training(self.parts.unet, self.cfg, self.parts.family.lora_targets)

    def attach(self, engine) -> None:
        self.engine, self.module = engine, engine.module
        if self.cfg.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable(), decay=self.cfg.ema_decay)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def micro_step(self, engine, step, micro):
        import ray.train

        from .data import infinite_batches

        cfg, device = self.cfg, self.worker.device
        if self.prompt_batches is None:
            self.prompt_batches = infinite_batches(ray.train.get_dataset_shard("prompts"), cfg.train_batch_size,
                                                   ("prompt",))
            if cfg.pretrain_enabled:
                self.pretrain_batches = infinite_batches(ray.train.get_dataset_shard("pretrain"),
                                                         cfg.pretrain_batch_size, ("pixels", "caption"))
        seed = ((cfg.seed * 1_000_003 + step) * 64 + micro) * 128 + self.worker.rank
        use_reward, use_pretrain = update_kinds(cfg, step)
        loss = torch.zeros((), device=device)
        stats: dict[str, float] = {}
        if use_reward:
            prompts = [str(p) for p in next(self.prompt_batches)["prompt"]]
            reward_loss, details = reward_loss_step(engine, self.module, self.parts, self.reward, prompts, cfg,
                                                    device, self.worker.precision, seed)
            loss = loss + reward_loss
            stats["loss_reward"] = float(reward_loss.detach())
            stats.update({k: float(v) for k, v in details.items() if k != "objective"})
            if len(getattr(self.reward, "last_terms", {})) > 1:  # a reward mix: each term's mean, unweighted
                stats.update({f"reward_train/{term}": v for term, v in self.reward.last_terms.items()})
        if use_pretrain:
            pretrain_loss = pretrain_loss_step(engine, self.parts, next(self.pretrain_batches), device, seed + 17,
                                               cfg.guidance_scale)
            loss = loss + cfg.pretrain_weight * pretrain_loss
            stats["loss_pretrain"] = float(pretrain_loss.detach())
        return loss, stats

    def after_update(self, engine, step) -> None:
        if self.ema is not None:
            self.ema.step(self.trainable())

    def update_record(self, step: int, micro_stats: list[dict[str, float]]) -> dict:
        """The update's objective, each micro-batch's gradient plan (AlignProp: truncation K = grad_steps, the
        first step with gradient = grad_index) and its mean losses."""
        planned = [s for s in micro_stats if "grad_index" in s]
        record = {"step": step, "objective": self.cfg.objective,
                  "grad_index": [int(s["grad_index"]) for s in planned],
                  "grad_steps": [int(s["grad_steps"]) for s in planned]}
        terms = sorted({key for s in micro_stats for key in s if key.startswith("reward_train/")})
        for key in ("loss_reward", "loss_pretrain", "reward_train", *terms):
            values = [s[key] for s in micro_stats if key in s]
            if values:
                record[key] = sum(values) / len(values)
        return record

    def evaluate(self, engine, step):
        if self.worker.rank != 0:
            return {}
        trainable = self.trainable()
        if self.ema is not None:
            self.ema.store(trainable)
            self.ema.copy_to(trainable)
        try:
            metrics, png = evaluate_held_out(self.module, self.parts, self.reward, self.cfg, self.worker.device,
                                             self.worker.precision, step)
        finally:
            if self.ema is not None:
                self.ema.restore(trainable)
        self.grids[f"step_{step:06d}.png"] = png
        metrics = {k: v for k, v in metrics.items() if k != "step"}
        return metrics

    def export(self, directory: Path) -> None:
        if self.ema is not None:
            self.ema.copy_to(self.trainable())  # after DeepSpeed saved the trained weights: export the average
        save_final_model(self.module, self.parts, self.cfg, directory / "final")

    def save_files(self, directory: Path) -> None:
        (directory / "eval").mkdir(exist_ok=True)
        for name, data in self.grids.items():
            (directory / "eval" / name).write_bytes(data)
        if self.ema is not None:
            torch.save(self.ema.state_dict(), directory / EMA_FILE)

    def load_files(self, directory: Path) -> None:
        if self.ema is not None and (directory / EMA_FILE).is_file():
            self.ema.load_state_dict(torch.load(directory / EMA_FILE, map_location="cpu", weights_only=True))
        for png in sorted((directory / "eval").glob("*.png")):
            self.grids[png.name] = png.read_bytes()

    def curves(self, state: LoopState, directory: Path) -> list[Path]:
        from .viz import reward_curve

        history = [h for h in state.eval_history if "eval_reward" in h]
        if not history:
            return []
        return [reward_curve(history, directory / "reward_curve.png")]
