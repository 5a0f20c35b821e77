"""`ReFLConfig`: every knob of ReFL (reward feedback learning, SPEC 3) with its unit and meaning.

Defaults are the reference / paper recipe where one exists (40 sampling steps, gradient step drawn from
[30, 39], lambda 2, grad_scale 1e-3, AdamW lr 1e-5 wd 1e-2, clip 1.0), plus the paper's pre-training loss
(on by default). The offline defaults (`pretrained="tiny"`, `reward=None`) run without any download.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_EVAL_PROMPTS = (
    "one large red circle on a white background",
    "two small blue squares on a black background",
    "three large yellow triangles on a gray background",
    "one small green square on a white background",
)


@dataclass
class ReFLConfig:
    """ReFL fine-tuning of a Stable Diffusion UNet against a reward model, on Ray Train + DeepSpeed."""

    # --- models ---
    pretrained: str = "tiny"  # SD pipeline: hub name ("CompVis/stable-diffusion-v1-4"), a save_pretrained dir,
    #                           or "tiny" = the random-weight tiny pipeline built from configs on every worker
    tiny_seed: int = 0  # torch seed of the tiny pipeline's weights (pretrained="tiny" only)
    reward: str | None = None  # reward model: a name ("ImageReward-v1.0"), an official .pt, or a rayapp
    #                            save_pretrained dir; None = a random-but-fixed tiny RM (seed reward_seed)
    reward_tokenizer: str | None = None  # RM tokenizer dir / hub name when `reward` does not carry one
    reward_seed: int = 0  # torch seed of the random tiny RM (reward=None only)
    # --- data ---
    prompts: str | None = None  # prompt file: reference JSON list [{"text": ...}] (or of strings), plain text
    #                             one prompt per line, or Parquet file/dir; None = the built-in tiny prompts
    prompt_column: str = "text"  # JSON key / Parquet column of the prompt ("prompt" and "caption" also tried)
    pretrain_data: str | None = None  # image-text set for the pre-training loss: Parquet file/dir with image
    #                                   bytes + caption (comparison shards: the best-ranked image per prompt)
    # --- sampling (ReFL forward pass) ---
    num_inference_steps: int = 40  # scheduler steps per sample (SPEC 3: 40)
    grad_step_min: int = 30  # 0-based index of the earliest sampling step that may carry the gradient
    grad_step_max: int = 39  # latest such index (inclusive); drawn uniformly in [min, max] per update
    scheduler: str = "ddim"  # "ddim" or "ddpm" (the pipeline's beta schedule is kept)
    eta: float = 0.0  # DDIM eta (0 = deterministic DDIM); ignored by DDPM
    guidance_scale: float = 1.0  # classifier-free guidance weight; <= 1 = none (the reference trains without)
    # --- objective ---
    reward_target: float = 2.0  # lambda: loss = mean(ReLU(lambda - reward)) x grad_scale; reward in RM units
    grad_scale: float = 1e-3  # multiplier of the reward loss (SPEC 3: 1e-3)
    pretrain_weight: float = 1.0  # multiplier of the pre-training denoising loss (MSE, latent units); 0 = off
    pretrain_mode: str = "joint"  # "joint": added to the reward loss of the same update; "alternate": its own
    #                               updates (paper Alg. 1), interleaved with reward updates
    pretrain_every: int = 1  # joint: add it on every k-th update; alternate: every k-th update is a pre-training
    #                          update (k >= 2), the others reward updates
    pretrain_batch_size: int = 2  # images per worker per pre-training loss evaluation
    # --- optimisation ---
    train_batch_size: int = 2  # prompts per worker per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer update
    max_steps: int = 100  # optimizer updates in total (a resumed run continues up to this count)
    learning_rate: float = 1e-5  # AdamW lr (constant)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decays
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 1e-2  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # global gradient L2-norm clip per update; 0 = off
    lora_rank: int = 0  # 0 = fine-tune the full UNet; > 0 = LoRA of this rank on the attention projections
    lora_alpha: float | None = None  # LoRA scale numerator (alpha / rank); None = rank (scale 1)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (less memory, ~30% slower)
    use_ema: bool = False  # keep an exponential moving average of the trained weights; eval + export use it
    ema_decay: float = 0.9999  # EMA decay per update
    seed: int = 0  # base seed for noise, the gradient-step draw and pre-training noise (per rank and step)
    # --- distribution ---
    num_workers: int = 2  # Ray Train workers = data-parallel ranks
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # logical CPUs each worker reserves (leave some to Ray Data on small hosts)
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16" (autocast, fp32 master
    #                          weights), "fp16" (DeepSpeed fp16 weights + dynamic loss scaling; GPU)
    zero_stage: int = 2  # DeepSpeed ZeRO stage (2 = optimizer state + gradients partitioned)
    # --- evaluation, checkpoints, output ---
    eval_prompts: tuple[str, ...] = DEFAULT_EVAL_PROMPTS  # fixed held-out prompts
    eval_seeds: tuple[int, ...] = (0, 1)  # one image per (prompt, seed); same noise at every evaluation
    eval_every: int = 10  # evaluate (grid PNG + mean reward report) every this many updates; 0 = start/end only
    checkpoint_every: int = 0  # Ray Train checkpoint every this many updates; 0 = with every evaluation
    num_to_keep: int | None = 2  # checkpoints kept in storage; None = all
    max_failures: int = 0  # worker-group restarts from the latest checkpoint before the run fails
    resume_from: str | None = None  # a ReFL checkpoint dir (e.g. result.checkpoint.path) to continue from
    output_dir: str = "refl_output"  # final model (final/), eval grids (eval/), reward curve, history.json
    storage_path: str | None = None  # Ray Train storage (shared across nodes); None = <output_dir>/ray
    run_name: str | None = None  # Ray Train run name; None = "refl-<timestamp>"

    def __post_init__(self) -> None:
        self.eval_prompts = tuple(self.eval_prompts)
        self.eval_seeds = tuple(int(s) for s in self.eval_seeds)
        self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if not 0 <= self.grad_step_min <= self.grad_step_max < self.num_inference_steps:
            raise ValueError(
                f"need 0 <= grad_step_min <= grad_step_max < num_inference_steps, got "
                f"[{self.grad_step_min}, {self.grad_step_max}] with {self.num_inference_steps} steps"
            )
        if self.scheduler not in ("ddim", "ddpm"):
            raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {self.scheduler!r}")
        if self.pretrain_mode not in ("joint", "alternate"):
            raise ValueError(f"pretrain_mode must be 'joint' or 'alternate', got {self.pretrain_mode!r}")
        if self.pretrain_every < 1:
            raise ValueError("pretrain_every must be >= 1")
        if self.pretrain_mode == "alternate" and self.pretrain_weight > 0 and self.pretrain_every < 2:
            raise ValueError("pretrain_mode='alternate' needs pretrain_every >= 2 (else no reward updates)")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.lora_rank < 0:
            raise ValueError("lora_rank must be >= 0")
        if self.max_steps < 1 or self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("max_steps, train_batch_size and gradient_accumulation_steps must be >= 1")
        if not self.eval_prompts or not self.eval_seeds:
            raise ValueError("eval_prompts and eval_seeds must not be empty")

    @property
    def pretrain_enabled(self) -> bool:
        return self.pretrain_weight > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ReFLConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ReFLConfig fields: {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _field_comments() -> dict[str, str]:
    """Field -> its trailing comment in this file's source (the help text of the CLI flags)."""
    import inspect
    import re

    comments: dict[str, str] = {}
    current = None
    for line in inspect.getsource(ReFLConfig).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?#\s?(.*)$", line)
        if match:
            current = match.group(1)
            comments[current] = match.group(2).strip()
        elif current and re.match(r"\s+#\s+", line):
            comments[current] += " " + line.strip().lstrip("#").strip()
        else:
            current = None
    return comments


def add_config_arguments(parser: argparse.ArgumentParser, defaults: ReFLConfig | None = None) -> None:
    """One `--flag` per ReFLConfig field (help = the field's comment); bools take true/false."""
    defaults = defaults or ReFLConfig()
    comments = _field_comments()
    for f in dataclasses.fields(ReFLConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        helptext = comments.get(f.name, "") + f" (default: {value})"
        if isinstance(value, bool):
            parser.add_argument(flag, dest=f.name, default=value, help=helptext,
                                type=lambda s: s.lower() in ("1", "true", "yes", "on"))
        elif isinstance(value, tuple):
            kind = type(value[0]) if value else str
            parser.add_argument(flag, dest=f.name, default=value, nargs="+", type=kind, help=helptext)
        elif f.name in ("lora_alpha", "num_to_keep"):
            kind = float if f.name == "lora_alpha" else int
            parser.add_argument(flag, dest=f.name, default=value, type=kind, help=helptext)
        elif value is None:
            parser.add_argument(flag, dest=f.name, default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, default=value, type=type(value), help=helptext)


def config_from_args(args: argparse.Namespace) -> ReFLConfig:
    names = {f.name for f in dataclasses.fields(ReFLConfig)}
    return ReFLConfig(**{k: v for k, v in vars(args).items() if k in names})
