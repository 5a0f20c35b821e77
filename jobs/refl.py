"""ReFL: fine-tune a Stable Diffusion UNet against the ImageReward model on Ray Train + DeepSpeed.

On a GPU cluster (the dashboard address; the prompt file travels with --working-dir):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/refl.py --pretrained CompVis/stable-diffusion-v1-4 --reward ImageReward-v1.0 \
        --prompts prompts.json --pretrain-data /shared/laion_subset --use-gpu true --num-workers 8 \
        --output-dir /shared/refl --storage-path /shared/refl/ray
Locally, offline (starts a local Ray; the tiny SD pipeline, the tiny RM trained by jobs/train_rm.py if
runs/rm/model exists, else a random-but-fixed tiny RM; the synthetic set's images for the pre-training loss):
    python jobs/refl.py
    python jobs/refl.py --reward runs/rm/model --max-steps 40 --lora-rank 4
Prints the mean held-out reward before and after, and the paths of the last grid PNG and the reward curve.
Every ReFLConfig field is a flag (`--help`); `--resume-from CHECKPOINT_DIR` continues a run's step count.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# Offline-default overrides: small enough for 2 CPUs in a few minutes, strong enough to move a tiny RM.
OFFLINE_DEFAULTS = dict(
    num_inference_steps=8, grad_step_min=3, grad_step_max=7, max_steps=24, eval_every=8,
    learning_rate=3e-3, grad_scale=1.0, pretrain_weight=1e-3, train_batch_size=2, output_dir="runs/refl",
)
DEFAULT_RM_DIR = Path("runs/rm/model")  # where jobs/train_rm.py puts its model
DEFAULT_SYNTH_DIR = Path("runs/rm/data/train")  # ... and its synthetic training split


def main(argv: list[str] | None = None) -> int:
    from rayapp.train.refl_config import ReFLConfig, add_config_arguments, config_from_args

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    offline = "--pretrained" not in " ".join(argv) or "tiny" in argv
    defaults = ReFLConfig(**OFFLINE_DEFAULTS) if offline else ReFLConfig()
    add_config_arguments(parser, defaults)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    # Under `ray job submit` the working directory is a temporary copy: anchor relative paths here.
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    for name in ("prompts", "pretrain_data", "reward", "resume_from"):
        value = getattr(cfg, name)
        if value and Path(value).exists():
            setattr(cfg, name, str(Path(value).resolve()))

    if cfg.reward is None and cfg.pretrained == "tiny" and DEFAULT_RM_DIR.is_dir():
        cfg.reward = str(DEFAULT_RM_DIR.resolve())
    if cfg.reward is None:
        print("[refl] no --reward given and no trained tiny RM at runs/rm/model: using a random-but-fixed tiny "
              f"RM (seed {cfg.reward_seed}); ReFL climbs it, but its preferences mean nothing", flush=True)
    if cfg.pretrain_enabled and not cfg.pretrain_data:
        if cfg.pretrained != "tiny":
            parser.error("--pretrain-data is required with the pre-training loss on (or --pretrain-weight 0)")
        if DEFAULT_SYNTH_DIR.is_dir():
            cfg.pretrain_data = str(DEFAULT_SYNTH_DIR.resolve())
        else:
            from rayapp.data.synth import write_synthetic_set

            synth = Path(cfg.output_dir) / "synth"
            if not (synth / "train").is_dir():
                write_synthetic_set(synth, prompts=200, per_prompt=2, progress=False, overwrite=True)
            cfg.pretrain_data = str(synth / "train")
        print(f"[refl] pre-training loss on {cfg.pretrain_data}", flush=True)

    from rayapp.train.common import local_ray_init
    from rayapp.train.refl import run_refl

    local_ray_init()
    result = run_refl(cfg)
    print(f"mean held-out reward before: {result.reward_before:+.4f}")
    print(f"mean held-out reward after:  {result.reward_after:+.4f}  ({result.steps} updates)")
    print(f"grid PNG: {result.grid_png}")
    print(f"reward curve PNG: {result.curve_png}")
    print(f"final model ({'LoRA weights' if cfg.lora_rank else 'diffusers pipeline'}): {result.final_dir}")
    print(f"checkpoint (for --resume-from): {result.checkpoint}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
