"""`RMTrainConfig`: every knob of reward-model training, with its unit; per-preset defaults as data."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# Training defaults per model preset. "imagereward-v1" is the reference recipe (SPEC 2): Adam (0.9, 0.999),
# eps 1e-8, no weight decay, lr 1e-5, cosine, no warm-up, 10 epochs, 4 workers x 4 pairs x accum 4 = 64
# pairs per update, fix_rate 0.7, validation 4x per epoch. "tiny" trains from scratch on 2 CPUs; its recipe
# was picked by held-out pairwise accuracy after 6 epochs: lr 1e-3 with 150 warm-up updates reached 0.921 and
# 0.935 on the default synthetic set (seeds 0, 1234); on the set that also varies count it beat the earlier
# lr 3e-4 with 10 warm-up updates, 0.871 to 0.850; an earlier probe saw 1e-3 with only 10 warm-up updates
# stall at the ln 2 plateau (measured with tools/recipe_probe.py). Nothing is frozen because random lower
# layers are not worth keeping.
PRESET_TRAINING_DEFAULTS: dict[str, dict] = {
    "imagereward-v1": {
        "lr": 1e-5,
        "epochs": 10,
        "batch_pairs_per_worker": 4,
        "grad_accum": 4,
        "num_workers": 4,
        "use_gpu": True,
        "fix_rate": 0.7,
        "warmup_steps": 0,
        "evals_per_epoch": 4,
    },
    "tiny": {
        "lr": 1e-3,
        "epochs": 6,
        "batch_pairs_per_worker": 16,
        "grad_accum": 1,
        "num_workers": 2,
        "use_gpu": False,
        "fix_rate": 0.0,
        "warmup_steps": 150,
        "evals_per_epoch": 1,
    },
}


@dataclass
class RMTrainConfig:
    """Reward-model training on Ray Train + DeepSpeed; units and meaning in the field comments."""

    # --- model ---
    preset: str = "tiny"  # architecture preset (rayapp/model/presets/<name>.json) when init is None
    init: str | None = None  # starting weights: a name from rayapp.available_models(), an official .pt or a
    #                          save_pretrained dir; None = random init of `preset` (from scratch)
    tokenizer: str | None = None  # tokenizer dir / hub name; None = <data_dir>/tokenizer, else the init's own
    fix_rate: float | None = None  # share of lower encoder layers frozen (SPEC 2: 0.7); None = preset default
    # --- data ---
    data_dir: str | None = None  # dir with train/ and val/ Parquet comparison shards; None = synthesise one
    synth_prompts: int = 2000  # prompts in the synthetic set made when data_dir is None (80/10/10 split)
    synth_per_prompt: int = 4  # candidate images per synthetic prompt
    materialize: str = "auto"  # keep preprocessed pairs in Ray's object store after the first pass: "auto"
    #                            (when they fit in materialize_max_gib), "yes", "no" (re-read every epoch)
    materialize_max_gib: float = 2.0  # GiB of float32 pixels above which "auto" streams instead
    # --- schedule ---
    epochs: int | None = None  # passes over the training pairs; None = preset default
    max_steps: int | None = None  # optimizer updates in total; None = epochs x steps per epoch (overrides epochs)
    batch_pairs_per_worker: int | None = None  # pairs (2 images each) per micro-batch per worker
    grad_accum: int | None = None  # micro-batches per optimizer update
    lr: float | None = None  # peak learning rate; None = preset default (1e-5 full model, 1e-3 tiny)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decays
    eps: float = 1e-8  # Adam denominator epsilon
    weight_decay: float = 0.0  # decoupled weight decay per update (reference: none)
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio x lr at the last update) or "constant"
    warmup_steps: int | None = None  # updates of linear warm-up from 0 before the schedule; None = preset
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global gradient L2 norm per update; 0 = no clipping
    # --- distribution ---
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16" (autocast, fp32 master)
    num_workers: int | None = None  # Ray Train workers (data-parallel ranks); None = preset default
    use_gpu: bool | None = None  # one GPU per worker; None = preset default
    cpus_per_worker: float = 1.0  # logical CPUs each worker reserves; < 1 leaves CPUs to Ray Data on small hosts
    # --- reporting / checkpoints ---
    evals_per_epoch: int | None = None  # validation passes per epoch (SPEC 2: 4); the last one ends the epoch
    eval_every_steps: int = 0  # if > 0, validate every this many updates (and at epoch ends) instead
    log_every_steps: int = 10  # report train loss every this many updates (0 = only with validation)
    checkpoint_every_steps: int = 0  # extra Ray Train checkpoints every this many updates (0 = per epoch only)
    num_to_keep: int = 2  # Ray Train checkpoints kept in storage
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails
    seed: int = 1234  # torch seed (per rank: seed + rank for dropout, same seed for the initial weights)
    # --- output ---
    output_dir: str = "runs/rm"  # final model (model/, official/) and a summary.json are written here
    storage_path: str | None = None  # Ray Train storage (checkpoints, results); None = <output_dir>/ray
    run_name: str = "rm"  # Ray Train run name under storage_path
    # --- testing only ---
    fail_at_step: int | None = None  # rank 1 hard-exits once when about to run this update (fault tests)
    step_log: str | None = None  # file where rank 0 appends "attempt step" per finished update (fault tests)

    def resolved(self) -> RMTrainConfig:
        """A copy with every None default filled from the preset's training defaults."""
        defaults = PRESET_TRAINING_DEFAULTS.get(self.preset, PRESET_TRAINING_DEFAULTS["imagereward-v1"])
        out = dataclasses.replace(self)
        for name, value in defaults.items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        out.betas = tuple(out.betas)
        if out.storage_path is None:
            out.storage_path = str(Path(out.output_dir).resolve() / "ray")
        return out

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings (call on a resolved config)."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.materialize not in ("auto", "yes", "no"):
            raise ValueError(f"materialize must be auto, yes or no, got {self.materialize!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if not 0.0 <= self.fix_rate < 1.0:
            raise ValueError(f"fix_rate must be in [0, 1), got {self.fix_rate}")
        for name in ("batch_pairs_per_worker", "grad_accum", "num_workers", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def pairs_per_update(self) -> int:
        """Effective batch: pairs per optimizer update over all workers."""
        return self.batch_pairs_per_worker * self.grad_accum * self.num_workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RMTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RMTrainConfig fields: {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def add_cli_arguments(parser) -> None:
    """One `--flag` per config field (dashes for underscores), defaults from the dataclass."""
    for f in dataclasses.fields(RMTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "betas":
            parser.add_argument(flag, type=float, nargs=2, default=list(default), metavar=("B1", "B2"))
        elif f.name == "use_gpu":
            parser.add_argument(flag, default=None, action=_BoolOrNone, nargs="?", const=True)
        else:
            parser.add_argument(flag, type=_field_type(f.type), default=default)


def config_from_args(args) -> RMTrainConfig:
    """Build the config from an argparse namespace made with add_cli_arguments."""
    names = {f.name for f in dataclasses.fields(RMTrainConfig)}
    return RMTrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def _field_type(annotation: str):
    # Annotations are strings (from __future__); map them onto argparse converters.
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


class _BoolOrNone:
    """argparse action: `--use-gpu` / `--use-gpu false`."""

    def __new__(cls, *args, **kwargs):
        import argparse

        class Action(argparse.Action):
            def __call__(self, parser, namespace, values, option_string=None):
                if isinstance(values, str):
                    values = values.lower() in ("1", "true", "yes", "on")
                setattr(namespace, self.dest, values)

        return Action(*args, **kwargs)
