"""`ReFLConfig`: every setting of ReFL (reward feedback learning, SPEC 3) with its unit and meaning.

The dataclass defaults are the paper / reference recipe for SD 1.x (40 sampling steps, gradient step drawn from
[30, 39], lambda 2, grad_scale 1e-3, AdamW lr 1e-5 wd 1e-2, clip 1.0, constant lr, batch 2 x accumulation 4,
100 updates) plus the paper's pre-training loss. Presets are data in `presets/*.json`: `offline` (the tiny
pipeline and tiny RM on 2 CPUs, no download), `offline-sdxl` (the same with the tiny SDXL pipeline), `sd15`
(the paper's recipe on Stable Diffusion 1.5), `sd14` (the reference run's base model, SD 1.4) and `sdxl` (the
reference's SDXL LoRA recipe: 1024 px, 16 prompts per GPU, lr 1e-4, LoRA rank 4); for the flow-matching
transformers `offline-sd3` / `offline-flux` (the tiny SD3 / FLUX pipelines on 2 CPUs) and `sd35-medium` / `flux-dev`
(flow-GRPO's SD3.5-M and FLUX.1-dev recipes: 512 px, LoRA rank 32 / alpha 64, lr 3e-4; see docs/REFL.md).

Objectives (`objective`) share one sampled trajectory and differ only in where the gradient flows:
`refl` (one step drawn from [grad_step_min, grad_step_max], the chain cut there), `draft-k` (the last
`draft_k` steps of the full chain), `draft-lv` (the last step, redone from `draft_lv_samples` re-noisings of
the final sample) and `alignprop` (the last K steps, K drawn from the truncation range per update, each
step checkpointed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rayapp.configs import load_presets, option
from rayapp.runtime.config import TrainingConfig

PRESETS = load_presets(Path(__file__).with_name("presets"))
DEFAULT_PRESET = "offline"
OBJECTIVES = ("refl", "draft-k", "draft-lv", "alignprop")
SCHEDULERS = ("ddim", "ddpm", "flow-euler")

DEFAULT_EVAL_PROMPTS = (
    "one large red circle on a white background",
    "two small blue squares on a black background",
    "three large yellow triangles on a gray background",
    "one small green square on a white background",
)


@dataclass
class ReFLConfig(TrainingConfig):
    """ReFL fine-tuning of a Stable Diffusion UNet against a reward model, on Ray Train + DeepSpeed."""

    PRESETS: ClassVar[dict[str, dict]] = PRESETS
    DEFAULT_PRESET: ClassVar[str] = DEFAULT_PRESET

    preset: str = option("sd15", "the named defaults this config started from (set by --preset)")
    # --- models ---
    pretrained: str = option("stable-diffusion-v1-5/stable-diffusion-v1-5",
                             "SD 1.x/2.x, SDXL, SD3 / SD3.5 or FLUX.1 pipeline: hub name, a save_pretrained dir, "
                             "or 'tiny' / 'tiny-sdxl' / 'tiny-sd3' / 'tiny-flux' (random-weight tiny pipelines "
                             "built from configs on every worker)")
    tiny_seed: int = option(0, "torch seed of the tiny pipeline's weights (pretrained='tiny*')")
    use_t5: bool = option(True, "SD3: load the optional T5 text encoder; false drops it (its states are zeros, as "
                                "diffusers does without text_encoder_3: ~9 GB less at full size); FLUX needs it")
    resolution: int | None = option(None, "output pixels (square; a multiple of the VAE factor, x 2 for SD3 / "
                                          "FLUX patches); none = the pipeline's own (512 SD 1.x, 1024 SDXL / "
                                          "SD3 / FLUX, 64 tiny)")
    reward: str | None = option("ImageReward-v1.0", "reward: an ImageReward (name, official .pt or rayapp dir), "
                                                    "'tiny' (the random-but-fixed tiny RM), another scorer "
                                                    "(CLIP, BLIP, Aesthetic, PickScore, HPSv2, HPSv2.1, "
                                                    "NAME:tiny), or a weighted sum "
                                                    "'imagereward:1.0,pickscore:0.5,hpsv2.1:0.5'; none = 'tiny'")
    reward_tokenizer: str | None = option(None, "RM tokenizer dir / hub name when `reward` does not carry one")
    reward_seed: int = option(0, "torch seed of the random tiny RM (reward none only)")
    # --- data ---
    prompts: str | None = option(None, "prompt file (path or URI): JSON list [{\"text\": ...}] or of strings, "
                                       "text one per line, or Parquet; none = the built-in tiny prompts")
    prompt_column: str = option("text", "JSON key / Parquet column of the prompt ('prompt', 'caption' also "
                                        "tried)")
    pretrain_data: str | None = option(None, "image-text Parquet set (path or URI) for the pre-training loss "
                                             "(comparison shards: the best-ranked image per prompt)")
    # --- sampling (ReFL forward pass) ---
    num_inference_steps: int = option(40, "scheduler steps per sample (SPEC 3: 40)")
    grad_step_min: int = option(30, "0-based index of the earliest sampling step that may carry the gradient")
    grad_step_max: int = option(39, "latest such index (inclusive); drawn uniformly in [min, max] per update")
    scheduler: str = option("ddim", "'ddim' or 'ddpm' (the pipeline's beta schedule is kept); SD3 / FLUX always "
                                    "sample with their flow-matching Euler scheduler ('flow-euler', set for them)")
    eta: float = option(0.0, "DDIM eta (0 = deterministic DDIM); ignored by DDPM")
    guidance_scale: float = option(1.0, "classifier-free guidance weight; <= 1 = none (the reference trains "
                                         "without); FLUX: the guidance embedding's value (no CFG)")
    # --- objective ---
    objective: str = option("refl", "where the gradient flows along the sampled trajectory: refl, draft-k, "
                                    "draft-lv or alignprop")
    draft_k: int = option(1, "draft-k: backpropagate through the last K sampling steps")
    draft_lv_samples: int = option(2, "draft-lv: re-noisings of the final sample, the last step redone with "
                                      "gradient on each (the gradient's variance falls as 1/N)")
    alignprop_truncation_min: int = option(1, "alignprop: fewest final sampling steps the gradient flows "
                                              "through (K drawn uniformly per update)")
    alignprop_truncation_max: int | None = option(None, "alignprop: most such steps; none = "
                                                        "num_inference_steps (the whole chain)")
    reward_target: float = option(2.0, "lambda: loss = mean(ReLU(lambda - reward)) x grad_scale (RM units)")
    grad_scale: float = option(1e-3, "multiplier of the reward loss (SPEC 3: 1e-3)")
    pretrain_weight: float = option(1.0, "multiplier of the pre-training denoising loss (MSE, latent units); "
                                         "0 = off")
    pretrain_mode: str = option("joint", "'joint': added to the reward loss of the same update; 'alternate': "
                                         "its own updates (paper Alg. 1)")
    pretrain_every: int = option(1, "joint: add it on every k-th update; alternate: every k-th update is a "
                                    "pre-training update (k >= 2)")
    pretrain_batch_size: int = option(2, "images per worker per pre-training loss evaluation")
    # --- optimisation (shared fields: see TrainingConfig) ---
    max_steps: int = option(100, "optimizer updates in total (a resumed run continues up to this count)")
    lora_rank: int | None = option(None, "0 = fine-tune the full denoiser; > 0 = LoRA of this rank on the "
                                         "attention projections; none = the family's default (SDXL: 4, SD3 / "
                                         "FLUX: 32, SD 1.x: 0)")
    lora_alpha: float | None = option(None, "LoRA scale numerator (alpha / rank); none = rank (scale 1)")
    gradient_checkpointing: bool = option(False, "recompute UNet activations in backward (less memory, ~30% "
                                                 "slower)")
    use_ema: bool = option(False, "keep an exponential moving average of the trained weights; eval + export "
                                  "use it")
    ema_decay: float = option(0.9999, "EMA decay per update")
    # --- evaluation ---
    eval_prompts: tuple[str, ...] = option(DEFAULT_EVAL_PROMPTS, "fixed held-out prompts")
    eval_seeds: tuple[int, ...] = option((0, 1), "one image per (prompt, seed); same noise at every evaluation")
    eval_every: int = option(10, "evaluate (grid PNG + mean reward report) every this many updates; 0 = "
                                 "start and end only")
    # --- overrides of shared defaults (the reference recipe) ---
    train_batch_size: int = option(2, "prompts per worker per micro-batch")
    gradient_accumulation_steps: int = option(4, "micro-batches per optimizer update")
    weight_decay: float = option(1e-2, "AdamW decoupled weight decay per update")
    num_workers: int = option(8, "Ray Train workers (data-parallel ranks)")
    use_gpu: bool = option(True, "one GPU per worker; asking a cluster without GPUs fails at once")
    checkpoint_every: int = option(0, "checkpoint every this many updates; 0 = with every evaluation")
    log_every: int = option(1, "report metrics and print a progress line every this many updates (0 = only "
                               "with evaluations and checkpoints)")
    output_dir: str = option("runs/refl", "final model (final/), eval grids (eval/), reward curve, history.json "
                                          "and config.json go here")

    def __post_init__(self) -> None:
        self.eval_prompts = tuple(self.eval_prompts)
        self.eval_seeds = tuple(int(s) for s in self.eval_seeds)
        super().__post_init__()

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings."""
        super().validate()
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if not 0 <= self.grad_step_min <= self.grad_step_max < self.num_inference_steps:
            raise ValueError(
                f"need 0 <= grad_step_min <= grad_step_max < num_inference_steps, got "
                f"[{self.grad_step_min}, {self.grad_step_max}] with {self.num_inference_steps} steps")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.pretrain_mode not in ("joint", "alternate"):
            raise ValueError(f"pretrain_mode must be 'joint' or 'alternate', got {self.pretrain_mode!r}")
        if self.pretrain_every < 1:
            raise ValueError("pretrain_every must be >= 1")
        if self.pretrain_mode == "alternate" and self.pretrain_weight > 0 and self.pretrain_every < 2:
            raise ValueError("pretrain_mode='alternate' needs pretrain_every >= 2 (else no reward updates)")
        if self.lora_rank is not None and self.lora_rank < 0:
            raise ValueError("lora_rank must be >= 0 (or none for the pipeline family's default)")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(f"resolution must be > 0 (or none for the pipeline's own), got {self.resolution}")
        self.validate_objective()
        if self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if not self.eval_prompts or not self.eval_seeds:
            raise ValueError("eval_prompts and eval_seeds must not be empty")

    def validate_objective(self) -> None:
        """Raise ValueError on objective settings that cannot be met with num_inference_steps."""
        steps = self.num_inference_steps
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 1 <= self.draft_k <= steps:
            raise ValueError(f"draft_k must be in [1, num_inference_steps={steps}], got {self.draft_k}")
        if self.draft_lv_samples < 1:
            raise ValueError(f"draft_lv_samples must be >= 1, got {self.draft_lv_samples}")
        low, high = self.alignprop_truncation_min, self.alignprop_truncation_range[1]
        if not 1 <= low <= high <= steps:
            raise ValueError(f"need 1 <= alignprop_truncation_min <= alignprop_truncation_max <= "
                             f"num_inference_steps={steps}, got [{low}, {high}]")

    @property
    def alignprop_truncation_range(self) -> tuple[int, int]:
        """(fewest, most) final steps AlignProp backpropagates through."""
        high = self.alignprop_truncation_max
        return self.alignprop_truncation_min, self.num_inference_steps if high is None else high

    @property
    def pretrain_enabled(self) -> bool:
        return self.pretrain_weight > 0
