"""The `rayapp` command line (also `python -m rayapp`); each sub-command is registered by its own module.

Only the chosen sub-command's module is imported (the training commands build their flags from configs that
import torch), so `rayapp --help` and `rayapp data ...` stay quick.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# sub-command -> (module exposing `register(subparsers)`, one-line help for the command list).
COMMANDS = {
    "score": ("rayapp.score_cli", "score images against a prompt"),
    "data": ("rayapp.data.cli", "comparison data: convert to Parquet shards, make a synthetic set, stats"),
    "eval": ("rayapp.eval.cli", "benchmarks: preference accuracy + Recall/Filter@K, generator ranking"),
    "generate": ("rayapp.eval.generate", "generate with diffusers, score with ImageReward, filter, sort, save"),
    "train-rm": ("rayapp.rm.cli", "train the reward model (Ray Train + DeepSpeed)"),
    "refl": ("rayapp.refl.cli", "ReFL: fine-tune Stable Diffusion against a reward model"),
    "score-dataset": ("rayapp.eval.score_dataset", "score an image collection with Ray Data into Parquet"),
    "serve": ("rayapp.serve.cli", "run a Ray Serve reward endpoint from a shipped or own config (like `serve run`)"),
    "offline-pipeline": ("rayapp.offline_pipeline", "the offline end-to-end job: RM -> Serve -> ReFL"),
}


def chosen_command(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not a top-level flag), if any."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `rayapp` parser: every sub-command listed, the one named in `argv` with all its flags."""
    parser = argparse.ArgumentParser(prog="rayapp", description="ImageReward on Ray: score, data, train-rm, refl, "
                                     "score-dataset, serve, eval, generate.")
    parser.add_argument("--verbose", action="store_true",
                        help="debug lines from rayapp and the INFO chatter of Ray, transformers, ... (default: off)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    chosen = chosen_command(sys.argv[1:] if argv is None else argv)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != chosen:
            subparsers.add_parser(name, help=help_text)  # listed only; its flags are read when it is chosen
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("rayapp"):
                parser.error(f"the {name!r} command is not part of this install ({err.name} is missing)")
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; bad input ends with a one-line message and exit status 2."""
    from rayapp.logs import setup_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser(argv).parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:  # bad input / missing files: a message, not a traceback
        print(f"rayapp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
