"""Train the ImageReward reward model with Ray Train + DeepSpeed, then score the held-out split.

On a running cluster (the dashboard address; .gitignore'd paths such as .venv/ and runs/ are not uploaded):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_rm.py --output-dir /tmp/rayapp-rm
Locally (starts a Ray instance in this process):
    python jobs/train_rm.py --output-dir runs/rm
Defaults are offline: a synthetic comparison set, the tiny preset, 2 CPU workers. The full model on GPUs:
    python jobs/train_rm.py --preset imagereward-v1 --init ImageReward-v1.0 --data-dir DIR --use-gpu
Every RMTrainConfig field is a flag (`--help`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    from rayapp.train.config import add_cli_arguments, config_from_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    parser.add_argument("--no-eval", action="store_true", help="skip scoring the test split at the end")
    parser.add_argument("--data-progress-bars", action="store_true",
                        help="show Ray Data's progress bars (off: the loop prints one progress line per report)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    # Under `ray job submit` the working directory is a temporary copy: anchor relative outputs here.
    config.output_dir = str(Path(config.output_dir).resolve())

    from rayapp.train.common import local_ray_init, quiet_data_progress_bars
    from rayapp.train.rm_trainer import (
        build_trainer,
        collect_result,
        describe_plan,
        prepare,
    )

    local_ray_init()
    if not args.data_progress_bars:
        quiet_data_progress_bars()
    config, data_dir, tokenizer, plan = prepare(config)
    print(describe_plan(config, plan), flush=True)
    result = collect_result(config, plan, _fit(build_trainer(config, data_dir, tokenizer, plan)))
    print(f"best val loss {result.metrics.get('best_val_loss')} at update {result.metrics.get('best_step')}; "
          f"reward normalisation mean {result.metrics.get('reward_mean'):.4f} std {result.metrics.get('reward_std'):.4f}")
    print(f"model saved to {result.model_dir} (rayapp format) and {result.official_dir} (official ImageReward.pt)")

    test_dir = data_dir / "test"
    if not args.no_eval and test_dir.is_dir() and tokenizer:
        import rayapp
        from rayapp.train.rm_eval import pairwise_accuracy
        from rayapp.train.rm_trainer import count_split_pairs

        # Small splits are quicker to decode here than to start Ray Data actors for.
        big = count_split_pairs(test_dir) > 5000
        scores = pairwise_accuracy(rayapp.load(result.model_dir), test_dir, tokenizer_dir=tokenizer, use_ray=big)
        kinds = ", ".join(f"{k[9:]} {v:.3f}" for k, v in scores.items() if k.startswith("accuracy_"))
        print(f"held-out pairwise accuracy {scores['accuracy']:.3f} on {scores['pairs']} pairs ({kinds})")
        Path(result.model_dir, "..", "test_accuracy.json").resolve().write_text(json.dumps(scores, indent=2) + "\n")
    return 0


def _fit(trainer):
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
