"""Train the ImageReward reward model with Ray Train + DeepSpeed, then score the held-out split.

Locally (starts a Ray sized like this machine; offline preset: synthetic set, tiny model, 2 CPU workers):
    python jobs/train_rm.py --output-dir runs/rm
On a running cluster (see README "Ray clusters"; .gitignore'd paths such as .venv/ and runs/ are not uploaded):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_rm.py --output-dir /tmp/rayapp-rm
The reference recipe on GPUs:
    python jobs/train_rm.py --preset imagereward-v1 --init ImageReward-v1.0 --data-dir DIR
Every RMTrainConfig field is a flag (`--help`); `--config runs/rm/config.json` repeats a run.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from rayapp.envcheck import require_job_dependencies

require_job_dependencies("jobs/train_rm.py")

logger = logging.getLogger("rayapp.jobs.train_rm")


def main(argv: list[str] | None = None) -> int:
    from rayapp.configs import parse_config
    from rayapp.logs import setup_logging
    from rayapp.rm import RMTrainConfig, train_reward_model
    from rayapp.rm.config import DEFAULT_PRESET, PRESETS

    def job_flags(parser):
        parser.add_argument("--no-eval", action="store_true", help="skip scoring the test split at the end")

    config, args = parse_config(RMTrainConfig, argv, presets=PRESETS, default_preset=DEFAULT_PRESET,
                                description=__doc__.splitlines()[0], extra=job_flags)
    setup_logging(args.verbose)
    result = train_reward_model(config, verbose=args.verbose)
    metrics = result.metrics
    logger.info("best val loss %s at update %s; reward normalisation mean %.4f std %.4f",
                metrics.get("best_val_loss"), metrics.get("best_step"), metrics["reward_mean"], metrics["reward_std"])
    logger.info("model saved to %s (rayapp format) and %s (official ImageReward.pt)",
                result.model_dir, result.official_dir)
    if not args.no_eval:
        report_held_out_accuracy(result)
    return 0


def report_held_out_accuracy(result) -> None:
    """Pairwise accuracy of the exported model on the data set's test split, if it has one."""
    import rayapp
    from rayapp.data.storage import is_uri
    from rayapp.rm.driver import count_split_pairs
    from rayapp.rm.evaluation import pairwise_accuracy

    test_dir = f"{result.plan.data_dir.rstrip('/')}/test"
    if not is_uri(test_dir) and not Path(test_dir).is_dir():
        return
    tokenizer = result.plan.tokenizer
    # Small splits are quicker to decode here than to start Ray Data actors for.
    use_ray = bool(tokenizer) and count_split_pairs(test_dir) > 5000
    scores = pairwise_accuracy(rayapp.load(result.model_dir), test_dir, tokenizer_dir=tokenizer, use_ray=use_ray)
    kinds = ", ".join(f"{k[9:]} {v:.3f}" for k, v in scores.items() if k.startswith("accuracy_"))
    logger.info("held-out pairwise accuracy %.3f on %d pairs (%s)", scores["accuracy"], scores["pairs"], kinds)
    (Path(result.model_dir).parent / "test_accuracy.json").write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
