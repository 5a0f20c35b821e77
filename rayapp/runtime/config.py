"""`TrainingConfig`: the settings reward-model training and ReFL share, each with its unit and meaning."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rayapp.configs import config_from_dict, option, save_config


@dataclass
class TrainingConfig:
    """Optimisation, distribution and checkpoint settings common to every training loop."""

    PRESETS: ClassVar[dict[str, dict]] = {}  # named field values (a subclass's presets/*.json)
    DEFAULT_PRESET: ClassVar[str] = ""

    # --- optimisation ---
    train_batch_size: int = option(2, "examples per worker per micro-batch (RM: comparison pairs; ReFL: prompts)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer update")
    learning_rate: float = option(1e-5, "peak learning rate of the optimizer")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "Adam moment decays (beta1 beta2)")
    adam_eps: float = option(1e-8, "Adam denominator epsilon")
    weight_decay: float = option(0.0, "decoupled weight decay per update (AdamW); 0 = none")
    max_grad_norm: float = option(1.0, "clip the global gradient L2 norm to this per update; 0 = no clipping")
    lr_scheduler: str = option("constant", "'constant' or 'cosine' (to min_lr_ratio x learning_rate at the "
                                           "last update)")
    warmup_steps: int = option(0, "updates of linear warm-up from 0 before the schedule")
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of learning_rate")
    seed: int = option(0, "base seed (per rank and update where randomness must differ)")
    # --- distribution ---
    num_workers: int = option(2, "Ray Train workers (data-parallel ranks)")
    use_gpu: bool = option(False, "one GPU per worker; asking a cluster without GPUs fails at once")
    cpus_per_worker: float | None = option(None, "logical CPUs each worker reserves; none = fit the cluster: at "
                                                 "most 1, leaving one CPU to Ray Data and the driver")
    placement_strategy: str = option("PACK", "where workers go: PACK (fill nodes) or SPREAD (one per node "
                                             "where possible)")
    precision: str = option("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'fp32', 'bf16' (autocast, fp32 master "
                                    "weights), 'fp16' (DeepSpeed loss scaling; GPU only)")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage 0-3 (2: optimizer state and gradients partitioned)")
    wait_for_resources: bool = option(False, "wait for an autoscaler to add what the workers need instead of "
                                             "failing at once")
    # --- checkpoints and output ---
    checkpoint_every: int = option(0, "extra checkpoints every this many updates (0: the loop's own cadence)")
    num_to_keep: int | None = option(2, "checkpoints kept in storage; none = all")
    max_failures: int = option(3, "worker-group restarts from the newest complete checkpoint before failing")
    resume_from: str | None = option(None, "a checkpoint (path or URI, e.g. a previous run's) to continue from "
                                           "when this run has none of its own")
    output_dir: str = option("runs/out", "final model, evaluation files and the resolved config.json go here")
    storage_path: str | None = option(None, "Ray Train storage for checkpoints (a path every node sees, or "
                                            "s3://...); none = <output_dir>/ray")
    run_name: str | None = option(None, "run name under storage_path; none = <job>-<timestamp>")
    # --- following a run ---
    log_every: int = option(10, "report metrics and print a progress line every this many updates (0 = only "
                                "with evaluations and checkpoints)")
    tracking: str = option("tensorboard", "where metrics go besides the console: a comma list of tensorboard "
                                          "(event files under <output_dir>/tensorboard), mlflow "
                                          "(MLFLOW_TRACKING_URI), wandb (WANDB_MODE=offline works), or none")

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        self.validate()

    @classmethod
    def from_preset(cls, name: str | None = None, **overrides):
        """A preset's config with some fields overridden (the Python API's `--preset`)."""
        name = name or cls.DEFAULT_PRESET
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(cls.PRESETS)}")
        return config_from_dict(cls, {**cls.PRESETS[name], "preset": name, **overrides}, source=f"preset {name}")

    @classmethod
    def from_dict(cls, data: dict):
        """The config of a mapping of field names (unknown names are an error)."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON (readable back with `--config`)."""
        save_config(self, path)

    def validate(self) -> None:
        """Raise ValueError on an inconsistent setting (every config is checked when it is made or replaced)."""
        self.validate_training()

    def validate_training(self) -> None:
        """Raise ValueError on an inconsistent shared setting."""
        preset = getattr(self, "preset", None)
        if self.PRESETS and preset not in self.PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(self.PRESETS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs a GPU (use_gpu); use fp32 or bf16 on CPU")
        if self.lr_scheduler not in ("constant", "cosine"):
            raise ValueError(f"lr_scheduler must be constant or cosine, got {self.lr_scheduler!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.log_every < 0:
            raise ValueError(f"log_every must be >= 0, got {self.log_every}")
        from .tracking import parse_tracking

        parse_tracking(self.tracking)  # names only; whether the packages are installed is checked at run time
