"""`rayapp train-rm` and `jobs/train_rm.py`: train the ImageReward reward model with Ray Train + DeepSpeed, then
score the held-out split.

Locally (starts a Ray sized like this machine; offline preset: synthetic set, tiny model, 2 CPU workers):
    rayapp train-rm --output-dir runs/rm
On a running cluster (see docs/CLUSTER.md; .gitignore'd paths such as .venv/ and runs/ are not uploaded):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train_rm.py --output-dir /tmp/rayapp-rm
The reference recipe on GPUs:
    rayapp train-rm --preset imagereward-v1 --init ImageReward-v1.0 --data-dir DIR
Every RMTrainConfig field is a flag (`--help`); `--config runs/rm/config.json` repeats a run.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rayapp.job_command import JobCommand

logger = logging.getLogger("rayapp.jobs.train_rm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's flags: --preset, --config, --verbose, --no-eval and one per RMTrainConfig field."""
    from rayapp.configs import add_job_arguments
    from rayapp.rm.config import DEFAULT_PRESET, PRESETS, RMTrainConfig

    def job_flags(job_parser):
        job_parser.add_argument("--no-eval", action="store_true", help="skip scoring the test split at the end")

    add_job_arguments(parser, RMTrainConfig, presets=PRESETS, default_preset=DEFAULT_PRESET, extra=job_flags)




def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Train with the config the flags resolve to, log where the model went, report held-out accuracy."""
    from rayapp.configs import config_from_args
    from rayapp.logs import setup_logging
    from rayapp.rm import RMTrainConfig, train_reward_model
    from rayapp.rm.config import DEFAULT_PRESET, PRESETS

    config = config_from_args(parser, args, RMTrainConfig, presets=PRESETS, default_preset=DEFAULT_PRESET)
    verbose = getattr(args, "verbose", False)
    setup_logging(verbose)
    result = train_reward_model(config, verbose=verbose)
    metrics = result.metrics
    logger.info("best val loss %s at update %s; reward normalisation mean %.4f std %.4f",
                metrics.get("best_val_loss"), metrics.get("best_step"), metrics["reward_mean"], metrics["reward_std"])
    logger.info("model saved to %s (rayapp format, with its model card README.md) and %s (official ImageReward.pt)",
                result.model_dir, result.official_dir)
    if not args.no_eval:
        report_held_out_accuracy(result)
    return 0


def report_held_out_accuracy(result) -> None:
    """Pairwise accuracy of the exported model on the data set's test split, if it has one."""
    import rayapp
    from rayapp.data.storage import is_uri
    from rayapp.rm.driver import count_split_pairs, write_run_card
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
    write_run_card(result, {f"test_{key}": value for key, value in scores.items()})


COMMAND = JobCommand("train-rm", "train the reward model (Ray Train + DeepSpeed)", __doc__, add_arguments, run)
build_parser, main, register = COMMAND.build_parser, COMMAND.main, COMMAND.register
