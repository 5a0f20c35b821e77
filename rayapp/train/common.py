"""Ray Train + DeepSpeed plumbing shared by reward-model training and ReFL (runs inside train workers)."""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"  # our loop state (step, epoch, history) next to DeepSpeed's files
DONE_PREFIX = "rank_done."  # one marker per rank, written after its part of a checkpoint
DS_TAG = "ds"  # DeepSpeed checkpoint tag (sub-directory) inside a Ray Train checkpoint


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """'auto' -> bf16 on GPU, fp32 on CPU; fp16 needs a GPU (no CPU fp16 conv kernels); else as given."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision == "fp16" and not use_gpu:
        raise ValueError("precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return precision


def disable_cpu_shm_comm() -> None:
    """Stop DeepSpeed from JIT-compiling its shared-memory allreduce op on CPU (~27 s per cold start).

    On CPU DeepSpeed builds `deepspeed_shm_comm` in every `init_distributed`; marking it incompatible makes it
    use plain gloo collectives, which is all a 2-worker CPU run needs.
    """
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(*, micro_batch: int, grad_accum: int, world_size: int, lr: float,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                     grad_clip: float = 1.0, zero_stage: int = 2, precision: str = "fp32",
                     optimizer: str = "Adam", steps_per_print: int = 10**9) -> dict:
    """The DeepSpeed config dict. `micro_batch` is per worker in DeepSpeed's sample unit (for us: pairs).

    The optimizer is torch's own Adam/AdamW (`torch_adam`), so nothing is JIT-compiled on any machine.
    bf16 uses DeepSpeed's torch autocast: fp32 master weights and an fp32 reward head, bf16 matmuls.
    """
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "optimizer": {
            "type": optimizer,
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                       "torch_adam": True},
        },
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": steps_per_print,
        "wall_clock_breakdown": False,
    }
    if optimizer == "Adam":
        # DeepSpeed's "Adam" means AdamW unless told otherwise; the reference uses plain Adam.
        config["optimizer"]["params"]["adam_w_mode"] = False
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision != "fp32":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return config


def lr_lambda(total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the peak lr at update `step`: linear warm-up, then cosine to min_ratio (or constant)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def initialize_engine(model: torch.nn.Module, config: dict, *, parameters: Iterable | None = None,
                      lr_schedule: Callable[[int], float] | None = None, use_gpu: bool = False):
    """`deepspeed.initialize` with our config; returns the engine (its optimizer / scheduler attached).

    The LR scheduler is a torch LambdaLR handed to DeepSpeed, which steps it once per update and keeps its
    state in DeepSpeed checkpoints (DeepSpeed's WarmupCosineLR refuses zero warm-up, the reference's choice).
    """
    import deepspeed

    if not use_gpu:
        disable_cpu_shm_comm()
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    scheduler = None
    if lr_schedule is not None:
        def scheduler(optimizer):  # DeepSpeed calls this with its (possibly wrapped) optimizer
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                           lr_scheduler=scheduler)
    return engine


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def world() -> tuple[int, int]:
    """(rank, world size) of this train worker; (0, 1) outside a distributed run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of a list of floats over all ranks (float64, so counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if world()[1] > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def all_ranks_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only if `flag` is true on every rank (lets all ranks stop together when one runs out of data)."""
    return all_reduce_sum([0.0 if flag else 1.0], device)[0] == 0.0


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's weights as CPU tensors on every rank (gathers ZeRO-3 partitions)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_full_state_dict(engine, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into the engine's module on every rank (scatters under ZeRO-3).

    Only the module weights change; optimizer state is untouched (use for evaluation / export).
    """
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if world()[0] == 0:
                module.load_state_dict(state)
        return
    module.load_state_dict(state)
    if engine.zero_optimization_stage() in (1, 2) and engine.optimizer is not None:
        # ZeRO 1/2 keep fp32 master copies; without a refresh the next update would restore old weights.
        refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()


def save_checkpoint(engine, directory: str | Path, state: dict, extra: Callable[[Path], None] | None = None):
    """Collective: DeepSpeed engine (weights, optimizer, scheduler) + our loop state into `directory`.

    Every rank writes its own ZeRO partition; rank 0 writes `trainer_state.json` and calls `extra(dir)` for
    anything else (e.g. the best weights so far). The caller reports the directory to Ray Train.
    """
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=DS_TAG)
    rank, world_size = world()
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({**state, "world_size": world_size}))
        if extra is not None:
            extra(directory)
    # Written last: a persisted checkpoint holding every rank's marker is complete (see newest_checkpoint).
    (directory / f"{DONE_PREFIX}{rank}").write_text("ok")


def quiet_report_log() -> None:
    """Silence Ray Train's INFO line per `ray.train.report` (the whole metrics dict, from every rank); the
    loops print their own one-line progress on rank 0 instead. A no-op where Ray moved that logger."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logger = getattr(context, "logger", None)
    if isinstance(logger, logging.Logger):
        logger.setLevel(logging.WARNING)


def quiet_data_progress_bars() -> None:
    """No Ray Data progress bars for datasets built after this call in this process (the driver).

    Training re-splits its datasets every epoch and each split's bar reaches the driver as a stream of
    carriage-return lines through the log monitor; the train loop's own progress line says the same.
    """
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def report(metrics: dict, engine=None, state: dict | None = None,
           extra: Callable[[Path], None] | None = None) -> None:
    """`ray.train.report` from every rank; with `engine`, also a checkpoint of it and `state`."""
    import ray.train

    if engine is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="rayapp-ckpt-") as tmp:
        save_checkpoint(engine, tmp, state or {}, extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _read_state(filesystem, path: str) -> dict | None:
    """Our loop state in a persisted checkpoint dir, or None if the dir is not a complete checkpoint."""
    import pyarrow.fs

    try:
        with filesystem.open_input_stream(f"{path}/{STATE_FILE}") as stream:
            state = json.loads(stream.read().decode())
        names = {info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(path))}
    except (OSError, ValueError):
        return None
    ranks = state.get("world_size", 1)
    if state.get("finished") or all(f"{DONE_PREFIX}{r}" in names for r in range(ranks)):
        return state
    return None


def newest_checkpoint():
    """The persisted checkpoint with the highest step: Ray Train's latest, or a newer complete one.

    Ray Train registers a reported checkpoint only when its controller next polls the workers; a worker that
    dies right after reporting can take that registration with it although every rank's files were
    persisted. Scanning the run's storage for complete checkpoints (all rank markers present) recovers them,
    so a restart loses only the updates after the last checkpoint written. Rank 0 chooses; all ranks follow.
    """
    import pyarrow.fs
    import ray.train

    chosen = ray.train.get_checkpoint()
    if world()[0] == 0:
        storage = ray.train.get_context().get_storage()
        filesystem, root = storage.storage_filesystem, storage.experiment_fs_path
        best_step = -1
        if chosen is not None:
            state = _read_state(chosen.filesystem, chosen.path)
            best_step = state["step"] if state else -1
        try:
            entries = filesystem.get_file_info(pyarrow.fs.FileSelector(root))
        except OSError:
            entries = []
        for info in sorted(entries, key=lambda i: i.path):
            if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            state = _read_state(filesystem, info.path)
            if state is not None and state["step"] > best_step:
                best_step = state["step"]
                chosen = ray.train.Checkpoint(info.path, filesystem=filesystem)
    if world()[1] > 1:
        box = [chosen]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen = box[0]
    return chosen


def restore_checkpoint(engine, on_directory: Callable[[Path], None] | None = None) -> dict | None:
    """Load the newest complete checkpoint into `engine`; returns our loop state, None if there is none.

    `on_directory(dir)` runs while the checkpoint is on local disk, for files beside DeepSpeed's.
    """
    checkpoint = newest_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        state["checkpoint_path"] = checkpoint.path
        if state.get("finished"):
            return state  # a final export checkpoint: nothing left to train, no engine state in it
        load_path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}")
        if on_directory is not None:
            on_directory(directory)
    return state


def local_ray_init(num_cpus: int | None = None, **kwargs) -> None:
    """Connect to RAY_ADDRESS if set (e.g. under `ray job submit`), else start a local Ray.

    A local Ray gets extra logical CPUs so Ray Data's tasks are not starved by the train workers on small hosts.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), **kwargs)
