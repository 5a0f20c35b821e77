"""DeepSpeed engines inside Ray Train workers: config, precision, initialisation and small collectives."""
from __future__ import annotations

import math
import os
import random
from collections.abc import Callable

import torch

from .config import TrainingConfig


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """'auto' -> bf16 on GPU, fp32 on CPU; fp16 needs a GPU (no CPU fp16 conv kernels); else as given."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision == "fp16" and not use_gpu:
        raise ValueError("precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return precision


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype frozen modules run in for a resolved precision."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def deepspeed_config(config: TrainingConfig, *, world_size: int, precision: str, optimizer: str = "Adam") -> dict:
    """The DeepSpeed config dict. `train_batch_size` is per worker, in DeepSpeed's sample unit.

    The optimizer is torch's own Adam/AdamW (`torch_adam`), so nothing is JIT-compiled on any machine.
    bf16 uses DeepSpeed's torch autocast: fp32 master weights, bf16 matmuls.
    """
    micro, accum = config.train_batch_size, config.gradient_accumulation_steps
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": config.max_grad_norm,
        "optimizer": {
            "type": optimizer,
            "params": {"lr": config.learning_rate, "betas": list(config.adam_betas), "eps": config.adam_eps,
                       "weight_decay": config.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optimizer == "Adam":
        # DeepSpeed's "Adam" means AdamW unless told otherwise; the reference RM training uses plain Adam.
        ds["optimizer"]["params"]["adam_w_mode"] = False
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif precision != "fp32":
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return ds


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


def disable_cpu_shm_comm() -> None:
    """Stop DeepSpeed from JIT-compiling its shared-memory allreduce op on CPU (~27 s per cold start).

    Marked incompatible, DeepSpeed falls back to plain gloo collectives, which is all a CPU run needs.
    """
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def initialize_engine(model: torch.nn.Module, config: TrainingConfig, *, total_steps: int, world_size: int,
                      precision: str, optimizer: str = "Adam"):
    """`deepspeed.initialize` for `model` with the shared settings; returns the engine.

    The LR schedule is a torch LambdaLR handed to DeepSpeed, which steps it once per update and keeps its state
    in DeepSpeed checkpoints (DeepSpeed's WarmupCosineLR refuses zero warm-up, the reference's choice).
    """
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on every worker that it guessed CPU
        disable_cpu_shm_comm()
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(total_steps, config.warmup_steps, config.lr_scheduler, config.min_lr_ratio)

    def scheduler(ds_optimizer):  # DeepSpeed calls this with its (possibly wrapped) optimizer
        return torch.optim.lr_scheduler.LambdaLR(ds_optimizer, schedule)

    ds_config = deepspeed_config(config, world_size=world_size, precision=precision, optimizer=optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
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
