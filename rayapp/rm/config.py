"""`RMTrainConfig`: every setting of reward-model training, with its unit and meaning.

The dataclass defaults are the reference recipe (SPEC 2: Adam (0.9, 0.999), eps 1e-8, no weight decay,
lr 1e-5, cosine, no warm-up, 10 epochs, 4 GPU workers x 4 pairs x accumulation 4 = 64 pairs per update,
fix_rate 0.7, validation 4x per epoch, seed 1234). Presets are data in `presets/*.json`:
`offline` (the tiny model from scratch on 2 CPUs) and `imagereward-v1` (the reference recipe).

The offline recipe (4,000 synthetic prompts, 4 epochs, lr 1e-3 after 300 warm-up updates, the `tiny-synth`
model) holds held-out pairwise accuracy >= 0.93 over seeds: `benchmarks/recipe_seeds.py` measures it (table in
the README). With 2,000 prompts validation accuracy levelled off near 0.88 while validation loss rose; with
only 10 warm-up updates lr 1e-3 stalled at the ln 2 plateau. Nothing is frozen: random lower layers are not
worth keeping.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rayapp.configs import load_presets, option
from rayapp.runtime.config import TrainingConfig

PRESETS = load_presets(Path(__file__).with_name("presets"))
DEFAULT_PRESET = "offline"


@dataclass
class RMTrainConfig(TrainingConfig):
    """Reward-model training on Ray Train + DeepSpeed."""

    PRESETS: ClassVar[dict[str, dict]] = PRESETS
    DEFAULT_PRESET: ClassVar[str] = DEFAULT_PRESET

    preset: str = option("imagereward-v1", "the named defaults this config started from (set by --preset)")
    # --- model ---
    model_preset: str = option("imagereward-v1", "architecture (rayapp/model/presets/<name>.json) when `init` "
                                                 "is none")
    init: str | None = option(None, "starting weights: a name from rayapp.available_models(), an official .pt "
                                    "or a save_pretrained dir; none = random init of model_preset")
    tokenizer: str | None = option(None, "tokenizer dir / hub name; none = <data_dir>/tokenizer, else the init's")
    fix_rate: float = option(0.7, "share of lower encoder layers frozen (SPEC 2: 0.7; 0 = train everything)")
    # --- data ---
    data_dir: str | None = option(None, "dir or URI with train/ and val/ Parquet comparison shards; none = make "
                                        "the synthetic set")
    synth_prompts: int = option(2000, "prompts in the synthetic set made when data_dir is none (80/10/10 split)")
    synth_per_prompt: int = option(4, "candidate images per synthetic prompt")
    materialize: str = option("auto", "keep preprocessed pairs in Ray's object store after the first pass: "
                                      "'auto' (when they fit materialize_max_gib), 'yes', 'no'")
    materialize_max_gib: float = option(2.0, "GiB of float32 pixels above which 'auto' streams instead")
    # --- schedule (shared optimiser fields: see TrainingConfig) ---
    num_epochs: int = option(10, "passes over the training pairs")
    max_steps: int | None = option(None, "optimizer updates in total; none = num_epochs x updates per epoch")
    evals_per_epoch: int = option(4, "validation passes per epoch (SPEC 2: 4); the last one ends the epoch")
    eval_every: int = option(0, "if > 0, validate every this many updates (and at epoch ends) instead")
    # --- overrides of shared defaults (the reference recipe) ---
    train_batch_size: int = option(4, "comparison pairs (2 images each) per worker per micro-batch")
    gradient_accumulation_steps: int = option(4, "micro-batches per optimizer update")
    lr_scheduler: str = option("cosine", "'constant' or 'cosine' (to min_lr_ratio x learning_rate at the last "
                                         "update)")
    seed: int = option(1234, "seed of the initial weights (same on every rank) and of dropout (seed + rank)")
    num_workers: int = option(4, "Ray Train workers (data-parallel ranks)")
    use_gpu: bool = option(True, "one GPU per worker; asking a cluster without GPUs fails at once")
    output_dir: str = option("runs/rm", "model/ (save_pretrained), official/ (ImageReward.pt), summary.json and "
                                        "config.json go here")

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings."""
        super().validate()
        if self.materialize not in ("auto", "yes", "no"):
            raise ValueError(f"materialize must be auto, yes or no, got {self.materialize!r}")
        if not 0.0 <= self.fix_rate < 1.0:
            raise ValueError(f"fix_rate must be in [0, 1), got {self.fix_rate}")
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    @property
    def pairs_per_update(self) -> int:
        """Effective batch: pairs per optimizer update over all workers."""
        return self.train_batch_size * self.gradient_accumulation_steps * self.num_workers
