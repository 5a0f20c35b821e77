"""`rayapp refl` and `jobs/refl.py`: ReFL, fine-tuning a Stable Diffusion UNet against the ImageReward model on
Ray Train + DeepSpeed.

Locally, offline (starts a Ray sized like this machine; preset `offline`: the tiny SD pipeline, the tiny RM
trained by `rayapp train-rm` if runs/rm/model exists, else a random-but-fixed tiny RM; the synthetic set's
images for the pre-training loss):
    rayapp refl
    rayapp refl --reward runs/rm/model --max-steps 40 --lora-rank 4
On a cluster (see docs/CLUSTER.md; the prompt file travels with --working-dir), the paper's recipe:
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/refl.py --preset sd15 --prompts prompts.json --pretrain-data s3://bucket/laion_subset \\
        --num-workers 8 --output-dir /shared/refl --storage-path /shared/refl/ray
SDXL (LoRA rank 4 by default, `--lora-rank 0` for the full UNet; 1024 px; the reference's SDXL recipe), and
the other objectives (`--objective draft-k --draft-k 2`, `draft-lv --draft-lv-samples 4`, `alignprop`):
    rayapp refl --preset sdxl --pretrained /models/sdxl-base --prompts prompts.json ...
    rayapp refl --preset offline-sdxl --objective alignprop      # offline: the tiny SDXL pipeline
Prints the mean held-out reward before and after, and the paths of the last grid PNG and the reward curve.
Every ReFLConfig field is a flag (`--help`); `--resume-from CHECKPOINT` continues a run's update count;
`--config runs/refl/config.json` repeats a run.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from rayapp.job_command import JobCommand

logger = logging.getLogger("rayapp.jobs.refl")

TRAINED_TINY_RM = Path("runs/rm/model")  # where `rayapp train-rm` puts its model by default
TRAINED_TINY_RM_DATA = Path("runs/rm/data/train")  # ... and its synthetic training split


def absolute_paths(cfg):
    """Local paths made absolute (under `ray job submit` the working directory is a temporary copy)."""
    from rayapp.data.storage import is_uri
    from rayapp.refl.rewards import absolute_reward_paths

    changes = {"output_dir": str(Path(cfg.output_dir).resolve()), "reward": absolute_reward_paths(cfg.reward)}
    for name in ("prompts", "pretrain_data", "resume_from"):
        value = getattr(cfg, name)
        if value and not is_uri(value) and Path(value).exists():
            changes[name] = str(Path(value).resolve())
    return replace(cfg, **changes)


def offline_inputs(cfg):
    """The offline preset's inputs: the trained tiny RM and its synthetic images when they exist, else a
    random tiny RM and a small synthetic set made here."""
    from rayapp.diffusion import TINY_PIPELINES

    if cfg.pretrained not in TINY_PIPELINES:
        if cfg.preset.startswith("offline"):
            logger.warning("[refl] --pretrained %s with the offline preset's CPU recipe (%d sampling steps, lr %g); "
                           "--preset sd15 or sdxl gives the paper's", cfg.pretrained, cfg.num_inference_steps,
                           cfg.learning_rate)
        return cfg
    if cfg.reward is None and TRAINED_TINY_RM.is_dir():
        cfg = replace(cfg, reward=str(TRAINED_TINY_RM.resolve()))
    if cfg.reward is None:
        logger.info("[refl] no --reward and no trained tiny RM at %s: a random-but-fixed tiny RM (seed %d); "
                    "ReFL climbs it, but its preferences mean nothing", TRAINED_TINY_RM, cfg.reward_seed)
    if cfg.pretrain_enabled and not cfg.pretrain_data:
        if TRAINED_TINY_RM_DATA.is_dir():
            cfg = replace(cfg, pretrain_data=str(TRAINED_TINY_RM_DATA.resolve()))
        else:
            from rayapp.data.synth import write_synthetic_set

            synth = Path(cfg.output_dir) / "synth"
            if not (synth / "train").is_dir():
                write_synthetic_set(synth, prompts=200, per_prompt=2, progress=False, overwrite=True)
            cfg = replace(cfg, pretrain_data=str(synth / "train"))
        logger.info("[refl] pre-training loss on %s", cfg.pretrain_data)
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's flags: --preset, --config, --verbose and one per ReFLConfig field."""
    from rayapp.configs import add_job_arguments
    from rayapp.refl.config import DEFAULT_PRESET, PRESETS, ReFLConfig

    add_job_arguments(parser, ReFLConfig, presets=PRESETS, default_preset=DEFAULT_PRESET)




def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ReFL with the config the flags resolve to and log the rewards and where the outputs went."""
    from rayapp.configs import config_from_args
    from rayapp.logs import setup_logging
    from rayapp.refl import ReFLConfig, run_refl
    from rayapp.refl.config import DEFAULT_PRESET, PRESETS

    cfg = config_from_args(parser, args, ReFLConfig, presets=PRESETS, default_preset=DEFAULT_PRESET)
    verbose = getattr(args, "verbose", False)
    setup_logging(verbose)
    result = run_refl(offline_inputs(absolute_paths(cfg)), verbose=verbose)
    logger.info("mean held-out reward before: %+.4f", result.reward_before)
    logger.info("mean held-out reward after:  %+.4f  (%d updates)", result.reward_after, result.steps)
    logger.info("grid PNG: %s", result.grid_png)
    logger.info("reward curve PNG: %s", result.curve_png)
    logger.info("final model (%s): %s", "LoRA weights" if result.config.lora_rank else "diffusers pipeline",
                result.final_dir)
    logger.info("checkpoint (for --resume-from): %s", result.checkpoint)
    return 0


COMMAND = JobCommand("refl", "ReFL: fine-tune Stable Diffusion against a reward model", __doc__, add_arguments, run)
build_parser, main, register = COMMAND.build_parser, COMMAND.main, COMMAND.register
