"""ReFL's driver side: the pipeline's family and resolution, the schedule, the datasets; the shared driver does
the rest.

Entry point: `run_refl(config)` (what `jobs/refl.py`, `rayapp refl` and the tests call).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from rayapp.runtime.callbacks import UpdateCallback
from rayapp.runtime.driver import TrainingJob, TrainingRun, run_training
from rayapp.runtime.loop import Schedule

from .config import ReFLConfig
from .task import ReFLTask

logger = logging.getLogger(__name__)


@dataclass
class ReFLResult:
    """What a ReFL run produced (paths on the driver's machine)."""

    eval_history: list  # eval records: step, eval_reward (PIL scoring path), eval_reward_tensor, eval_rewards
    reward_before: float | None  # mean held-out reward at the first evaluation of this run's history
    reward_after: float | None  # ... at the last
    steps: int  # optimizer updates reached
    completed_updates: list  # 0-based indices of the updates in the final model's history, in order
    updates: list  # rank 0's log entry per update: objective, grad_index / grad_steps per micro-batch, losses
    final_dir: str | None  # diffusers pipeline dir, or LoRA weights dir
    grid_png: str | None  # the last eval grid
    curve_png: str | None  # reward curve
    checkpoint: str | None  # the final Ray Train checkpoint (pass as resume_from)
    output_dir: str = ""
    metrics: dict = field(default_factory=dict)
    reports: list = field(default_factory=list)  # every metrics report, in order
    config: ReFLConfig | None = None  # the resolved config the run used


def make_schedule(cfg: ReFLConfig) -> Schedule:
    """Evaluate before the first update, every eval_every updates and at the end; checkpoint every
    checkpoint_every updates (0: with every evaluation) and at the end."""
    total = cfg.max_steps
    evals = {0, total} | (set(range(cfg.eval_every, total, cfg.eval_every)) if cfg.eval_every else set())
    every = cfg.checkpoint_every or cfg.eval_every
    return Schedule(
        total_steps=total,
        eval_steps=tuple(sorted(evals)),
        checkpoint_steps=tuple(range(every, total + 1, every)) if every else (total,),
        log_every=cfg.log_every,
        examples_per_update=cfg.train_batch_size * cfg.gradient_accumulation_steps * cfg.num_workers,
        example_unit="prompts",
    )


class ReFLJob(TrainingJob):
    """ReFL on the shared driver."""

    name = "refl"
    script = "jobs/refl.py"
    task = ReFLTask
    exports = ("final", "eval")

    def resolve(self, cfg: ReFLConfig) -> ReFLConfig:
        """From the pipeline's configs: its output resolution, the family's LoRA default (SDXL: LoRA rank 4; SD3 /
        FLUX: 32; SD 1.x: the full UNet) and sampler. A wrong --pretrained (unsupported class, a resolution the
        VAE / patching cannot take, a missing text encoder) fails here, before Ray starts any worker."""
        from rayapp.diffusion import family_and_resolution

        if cfg.pretrain_enabled and not cfg.pretrain_data:
            raise ValueError("the pre-training loss is on (pretrain_weight > 0) but pretrain_data is not set; "
                             "pass an image-text Parquet set or pretrain_weight=0")
        family, resolution = family_and_resolution(cfg.pretrained, cfg.resolution, cfg.use_t5)
        lora_rank = family.default_lora_rank if cfg.lora_rank is None else cfg.lora_rank
        scheduler = cfg.scheduler
        if family.flow_matching:
            scheduler = "flow-euler"  # the only sampler a velocity model has here
        elif scheduler == "flow-euler":
            raise ValueError(f"scheduler 'flow-euler' is for SD3 / FLUX; a {family.pipeline_class} samples with "
                             "'ddim' or 'ddpm'")
        return replace(cfg, resolution=resolution, lora_rank=lora_rank, scheduler=scheduler)

    def plan(self, cfg: ReFLConfig) -> tuple[Schedule, None]:
        return make_schedule(cfg), None

    def datasets(self, cfg: ReFLConfig, plan: None) -> dict:
        from .data import pretrain_dataset, prompt_dataset

        datasets = {"prompts": prompt_dataset(cfg.prompts, cfg.prompt_column)}
        if cfg.pretrain_enabled:
            datasets["pretrain"] = pretrain_dataset(cfg.pretrain_data, cfg.resolution)
        return datasets

    def describe(self, cfg: ReFLConfig, schedule: Schedule, plan: None, resources: dict) -> str:
        return (f"[refl] {cfg.num_workers} workers x {resources}, {cfg.placement_strategy}; {cfg.max_steps} updates "
                f"of {cfg.train_batch_size} prompts per worker x {cfg.gradient_accumulation_steps} accumulation; "
                f"{cfg.pretrained}, {cfg.resolution} px, objective {cfg.objective}, "
                f"{f'LoRA rank {cfg.lora_rank}' if cfg.lora_rank else 'full denoiser'}; tracking: {cfg.tracking}; "
                f"run {cfg.run_name} under {cfg.storage_path}")


def run_refl(cfg: ReFLConfig, *, callbacks: Sequence[UpdateCallback] = (), verbose: bool = False) -> ReFLResult:
    """Run ReFL on the connected Ray cluster (or a local one); outputs are collected in cfg.output_dir.

    `callbacks` are called on every rank before and after each update (see rayapp.runtime.callbacks).
    """
    return refl_result(run_training(ReFLJob(), cfg, callbacks=callbacks, verbose=verbose))


def refl_result(run: TrainingRun) -> ReFLResult:
    """The run's files in output_dir: history.json, updates.json, eval grids, the reward curve, final/."""
    import json

    out = Path(run.output_dir)
    history, updates = run.state.eval_history, run.state.updates
    if updates:
        (out / "updates.json").write_text(json.dumps(updates, indent=2) + "\n")
    if history:
        (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    grids = sorted((out / "eval").glob("step_*.png"))
    curve = out / "reward_curve.png"
    final = out / "final"
    return ReFLResult(
        eval_history=history,
        reward_before=history[0]["eval_reward"] if history else None,
        reward_after=history[-1]["eval_reward"] if history else None,
        steps=run.state.step, completed_updates=list(run.state.completed_updates), updates=updates,
        final_dir=os.fspath(final) if final.is_dir() else None,
        grid_png=os.fspath(grids[-1]) if grids else None,
        curve_png=os.fspath(curve) if curve.is_file() else None,
        checkpoint=run.checkpoint_path, output_dir=os.fspath(out), metrics=run.metrics, reports=run.reports,
        config=run.config,
    )
