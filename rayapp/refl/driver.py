"""Driver side of ReFL: datasets, workers sized to the cluster, the Ray Train `TorchTrainer`, the outputs.

Entry point: `run_refl(config)` (what `jobs/refl.py` and the tests call).
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

from rayapp.runtime import checkpoints, cluster
from rayapp.runtime.callbacks import UpdateCallback

from .config import ReFLConfig

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
    checkpoint: str | None  # the last Ray Train checkpoint (pass as resume_from)
    output_dir: str = ""
    metrics: dict = field(default_factory=dict)
    config: ReFLConfig | None = None  # the resolved config the run used


def pipeline_resolution_of(name: str, resolution: int | None = None) -> int:
    """Output resolution of a pipeline from its configs (dir or hub/cache), without loading weights."""
    from rayapp.diffusion import family_and_resolution

    return family_and_resolution(name, resolution)[1]


def resolve(cfg: ReFLConfig) -> ReFLConfig:
    """Fill the run-dependent fields: absolute output dir, storage path, run name, and from the pipeline's
    configs its output resolution and the family's LoRA default (SDXL: LoRA rank 4; SD 1.x: the full UNet)."""
    from rayapp.diffusion import family_and_resolution

    family, resolution = family_and_resolution(cfg.pretrained, cfg.resolution)
    lora_rank = family.default_lora_rank if cfg.lora_rank is None else cfg.lora_rank
    output_dir = os.fspath(Path(cfg.output_dir).resolve())
    return replace(cfg, output_dir=output_dir, storage_path=cfg.storage_path or os.fspath(Path(output_dir) / "ray"),
                   run_name=cfg.run_name or time.strftime("refl-%Y%m%d-%H%M%S"), resolution=resolution,
                   lora_rank=lora_rank)


def build_trainer(cfg: ReFLConfig, *, callbacks: Sequence[UpdateCallback] = (), verbose: bool = False):
    """The `TorchTrainer` (not started) for a resolved config."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from .data import pretrain_dataset, prompt_dataset

    resources = cluster.worker_resources(cfg, "jobs/refl.py")
    logger.info("[refl] %d workers x %s, %s; %d updates of %d prompts per worker x %d accumulation; %s, %d px, "
                "objective %s, %s", cfg.num_workers, resources, cfg.placement_strategy, cfg.max_steps,
                cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.pretrained, cfg.resolution, cfg.objective,
                f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full UNet")
    datasets = {"prompts": prompt_dataset(cfg.prompts, cfg.prompt_column)}
    if cfg.pretrain_enabled:
        datasets["pretrain"] = pretrain_dataset(cfg.pretrain_data, cfg.resolution)
    return TorchTrainer(
        train_loop_per_worker(),
        train_loop_config={"config": cfg.to_dict(), "callbacks": list(callbacks), "verbose": verbose},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources, placement_strategy=cfg.placement_strategy),
        run_config=checkpoints.run_config(cfg, verbose=verbose),
        datasets=datasets,
    )


def train_loop_per_worker():
    """The worker entry point (imported lazily: the loop module pulls in diffusers and DeepSpeed)."""
    from .loop import train_loop

    return train_loop


def run_refl(cfg: ReFLConfig, *, callbacks: Sequence[UpdateCallback] = (), verbose: bool = False) -> ReFLResult:
    """Run ReFL on the connected Ray cluster (or a local one); outputs are collected in cfg.output_dir.

    `callbacks` are called on every rank before and after each update (see rayapp.runtime.callbacks).
    """
    if cfg.pretrain_enabled and not cfg.pretrain_data:
        raise ValueError("the pre-training loss is on (pretrain_weight > 0) but pretrain_data is not set; "
                         "pass an image-text Parquet set or pretrain_weight=0")
    cfg = resolve(cfg)  # reads the pipeline's configs: a wrong --pretrained fails before Ray starts
    cluster.connect(verbose)
    if not verbose:
        cluster.quiet_data_progress_bars()
    cluster.worker_resources(cfg, "jobs/refl.py")  # fails fast, before datasets and workers
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(output_dir / "config.json")
    result = build_trainer(cfg, callbacks=callbacks, verbose=verbose).fit()
    if result.error is not None:
        raise result.error
    return collect_result(cfg, result)


def collect_result(cfg: ReFLConfig, result) -> ReFLResult:
    """Copy the final model, grids and history out of the last checkpoint; draw the reward curve."""
    from .viz import reward_curve

    output_dir = Path(cfg.output_dir)
    checkpoint = result.checkpoint
    state: dict = {}
    final_dir = grid_png = curve_png = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            state = json.loads((directory / checkpoints.STATE_FILE).read_text())
            if (directory / "final").is_dir():
                shutil.rmtree(output_dir / "final", ignore_errors=True)
                shutil.copytree(directory / "final", output_dir / "final")
                final_dir = os.fspath(output_dir / "final")
            if (directory / "eval").is_dir():
                shutil.copytree(directory / "eval", output_dir / "eval", dirs_exist_ok=True)
                pngs = sorted((output_dir / "eval").glob("step_*.png"))
                grid_png = os.fspath(pngs[-1]) if pngs else None
    history = state.get("eval_history", [])
    updates = state.get("updates", [])
    if updates:
        (output_dir / "updates.json").write_text(json.dumps(updates, indent=2) + "\n")
    if history:
        (output_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        curve_png = os.fspath(reward_curve(history, output_dir / "reward_curve.png"))
    return ReFLResult(
        eval_history=history,
        reward_before=history[0]["eval_reward"] if history else None,
        reward_after=history[-1]["eval_reward"] if history else None,
        steps=int(state.get("step", 0)), completed_updates=list(state.get("completed_updates", [])), updates=updates,
        final_dir=final_dir, grid_png=grid_png, curve_png=curve_png,
        checkpoint=checkpoint.path if checkpoint is not None else None,
        output_dir=os.fspath(output_dir), metrics=dict(result.metrics or {}), config=cfg,
    )
