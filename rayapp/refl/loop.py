"""The per-worker ReFL loop (runs inside each Ray Train worker) on the shared runtime."""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from rayapp.runtime import checkpoints, cluster
from rayapp.runtime import engine as rt
from rayapp.runtime.callbacks import notify

from .config import ReFLConfig
from .evaluation import evaluate_held_out
from .models import (
    load_diffusion_parts,
    load_reward_model,
    prepare_unet_for_training,
    save_final_model,
)
from .objective import pretrain_loss_step, reward_loss_step

logger = logging.getLogger(__name__)

EMA_FILE = "ema.pt"  # EMA shadow weights beside DeepSpeed's files (tensors and numbers only)


def update_kinds(cfg: ReFLConfig, step: int) -> tuple[bool, bool]:
    """(use the reward loss, use the pre-training loss) for 0-based update `step`."""
    if not cfg.pretrain_enabled:
        return True, False
    hit = step % cfg.pretrain_every == 0
    if cfg.pretrain_mode == "joint":
        return True, hit
    return (not hit), hit


def update_record(step: int, cfg: ReFLConfig, plans: list[dict], stats: dict[str, list[float]]) -> dict:
    """One update's log entry (rank 0): its objective, each micro-batch's gradient plan (AlignProp: the
    truncation K = grad_steps, the first step with gradient = grad_index) and its mean losses."""
    record = {"step": step, "objective": cfg.objective,
              "grad_index": [p["grad_index"] for p in plans], "grad_steps": [p["grad_steps"] for p in plans]}
    for key in ("loss_reward", "loss_pretrain", "reward_train"):
        if stats.get(key):
            record[key] = sum(stats[key]) / len(stats[key])
    return record


def timing_and_memory(step_times: list[float], device: torch.device) -> dict:
    """Seconds per update (the median leaves out the first, which includes data start-up) and peak memory."""
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (RSS)
    return {
        "train_step_seconds": sum(step_times) / max(1, len(step_times)),
        "train_step_seconds_median": statistics.median(step_times[1:] or step_times) if step_times else 0.0,
        "peak_memory_mb": peak_mb,
    }


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point: one data-parallel ReFL worker."""
    import ray.train
    import ray.train.torch

    from rayapp.logs import setup_logging

    from .data import infinite_batches

    setup_logging(verbose=loop_config.get("verbose", False))
    cluster.quiet_report_log()
    cfg = ReFLConfig.from_dict(loop_config["config"])
    callbacks = loop_config.get("callbacks", ())
    device = ray.train.torch.get_device()
    precision = rt.resolve_precision(cfg.precision, device.type == "cuda")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    cluster.log_worker_nodes()
    torch.manual_seed(cfg.seed + rank)

    parts = load_diffusion_parts(cfg, device, rt.precision_dtype(precision))
    rm = load_reward_model(cfg, device, rt.precision_dtype(precision))
    unet = prepare_unet_for_training(parts.unet, cfg)
    engine = rt.initialize_engine(unet, cfg, total_steps=cfg.max_steps, world_size=world_size,
                                  precision=precision, optimizer="AdamW")
    module = engine.module

    def trainable_params():
        return [p for p in module.parameters() if p.requires_grad]

    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable_params(), decay=cfg.ema_decay)

    state = {"step": 0, "completed_updates": [], "eval_history": [], "updates": [], "restarts": 0}
    grids: dict[str, bytes] = {}

    def read_extras(directory: Path) -> None:
        if ema is not None and (directory / EMA_FILE).is_file():
            ema.load_state_dict(torch.load(directory / EMA_FILE, map_location="cpu", weights_only=True))
        for png in sorted((directory / "eval").glob("*.png")):
            grids[png.name] = png.read_bytes()

    restored = checkpoints.restore_checkpoint(engine, resume_from=cfg.resume_from, strict=cfg.lora_rank == 0,
                                              on_directory=read_extras)
    if restored is not None:
        state = {**state, **restored}
        state["restarts"] += 1

    def write_extras(directory: Path, final: bool) -> None:
        (directory / "eval").mkdir(exist_ok=True)
        for name, data in grids.items():
            (directory / "eval" / name).write_bytes(data)
        if ema is not None:
            torch.save(ema.state_dict(), directory / EMA_FILE)
        if final:
            if ema is not None:
                ema.copy_to(trainable_params())
            save_final_model(module, parts, cfg, directory / "final")

    def run_eval(step: int) -> dict:
        if rank != 0:
            return {}
        if ema is not None:
            ema.store(trainable_params())
            ema.copy_to(trainable_params())
        try:
            metrics, png = evaluate_held_out(module, parts, rm, cfg, device, precision, step)
        finally:
            if ema is not None:
                ema.restore(trainable_params())
        grids[f"step_{step:06d}.png"] = png
        state["eval_history"].append(dict(metrics))
        logger.info("[refl] eval step %d: mean reward %+.4f (tensor path %+.4f)", step, metrics["eval_reward"],
                    metrics["eval_reward_tensor"])
        return metrics

    def report(metrics: dict, step: int, with_checkpoint: bool, final: bool = False) -> None:
        metrics = {**metrics, "step": step}
        if not with_checkpoint:
            checkpoints.report(metrics)
            return
        checkpoints.report(metrics, engine=engine, state={k: v for k, v in state.items() if k != "checkpoint_path"},
                           extra=lambda directory: write_extras(directory, final),
                           exclude_frozen=cfg.lora_rank > 0)

    if not state["eval_history"]:
        report(run_eval(state["step"]), state["step"], with_checkpoint=False)

    prompt_iter = infinite_batches(ray.train.get_dataset_shard("prompts"), cfg.train_batch_size, ("prompt",))
    pretrain_iter = None
    if cfg.pretrain_enabled:
        pretrain_iter = infinite_batches(ray.train.get_dataset_shard("pretrain"), cfg.pretrain_batch_size,
                                         ("pixels", "caption"))
    storage = context.get_storage()
    hook_args = (storage.storage_fs_path, storage.experiment_dir_name)
    checkpoint_every = cfg.checkpoint_every or cfg.eval_every
    running: dict[str, list[float]] = {}
    step_times: list[float] = []  # seconds per update in this attempt (the first includes data start-up)
    start_step = state["step"]
    while state["step"] < cfg.max_steps:
        step = state["step"]
        notify(callbacks, "before", step, rank, *hook_args)
        t0 = time.perf_counter()
        use_reward, use_pretrain = update_kinds(cfg, step)
        this_update: dict[str, list[float]] = {}
        plans: list[dict] = []  # rank 0's gradient plan of each micro-batch (AlignProp: its truncation K)
        for micro in range(cfg.gradient_accumulation_steps):
            seed = ((cfg.seed * 1_000_003 + step) * 64 + micro) * 128 + rank
            loss = torch.zeros((), device=device)
            stats: dict = {}
            if use_reward:
                prompts = [str(p) for p in next(prompt_iter)["prompt"]]
                r_loss, stats = reward_loss_step(engine, module, parts, rm, prompts, cfg, device, precision, seed)
                loss = loss + r_loss
                stats["loss_reward"] = float(r_loss.detach())
                plans.append({k: stats.pop(k) for k in ("grad_index", "grad_steps", "grad_timestep")})
                stats.pop("objective")
            if use_pretrain:
                p_loss = pretrain_loss_step(engine, parts, next(pretrain_iter), device, seed + 17)
                loss = loss + cfg.pretrain_weight * p_loss
                stats["loss_pretrain"] = float(p_loss.detach())
            engine.backward(loss)
            engine.step()
            for k, v in {**stats, **(plans[-1] if use_reward else {})}.items():
                this_update.setdefault(k, []).append(float(v))
        for k, v in this_update.items():
            running.setdefault(k, []).extend(v)
        if ema is not None:
            ema.step(trainable_params())
        state["step"] = step + 1
        state["completed_updates"].append(step)
        step_times.append(time.perf_counter() - t0)
        notify(callbacks, "after", step, rank, *hook_args)
        if rank == 0:
            state["updates"].append(update_record(step, cfg, plans, this_update))
            losses = " ".join(f"{k}={sum(v) / len(v):.5g}" for k, v in this_update.items()
                              if k.startswith(("loss", "reward")))
            where = " ".join(f"k={p['grad_index']}/K={p['grad_steps']}" for p in plans)
            logger.info("[refl] step %d/%d %.2fs %s %s %s", step + 1, cfg.max_steps, step_times[-1], cfg.objective,
                        where, losses)
        done = state["step"]
        is_last = done >= cfg.max_steps
        do_eval = is_last or (cfg.eval_every and done % cfg.eval_every == 0)
        do_checkpoint = is_last or (checkpoint_every and done % checkpoint_every == 0)
        if do_eval or do_checkpoint:
            metrics = run_eval(done) if do_eval else {}
            metrics.update({f"train_{k}": sum(v) / len(v) for k, v in running.items()})
            metrics.update(timing_and_memory(step_times, device))
            metrics["restarts"] = state["restarts"]
            running = {}
            report(metrics, done, with_checkpoint=bool(do_checkpoint), final=is_last)
    if start_step >= cfg.max_steps:  # resumed a finished run: still export the final model once
        report(run_eval(state["step"]), state["step"], with_checkpoint=True, final=True)
