"""The `rayapp` command line; each sub-command is registered by its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module exposing `register(subparsers)`; modules keep heavy imports inside their handlers.
COMMANDS = {
    "score": "rayapp.score_cli",
    "data": "rayapp.data.cli",
    "eval": "rayapp.eval.cli",
    "generate": "rayapp.eval.generate",
}


def build_parser() -> argparse.ArgumentParser:
    """The `rayapp` parser with every sub-command this install has."""
    parser = argparse.ArgumentParser(prog="rayapp", description="ImageReward on Ray: score, data, eval, generate.")
    parser.add_argument("--verbose", action="store_true",
                        help="debug lines from rayapp and the INFO chatter of Ray, transformers, ... (default: off)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("rayapp"):
                continue  # a sub-command whose module is not part of this install
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; bad input ends with a one-line message and exit status 2."""
    from rayapp.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:  # bad input / missing files: a message, not a traceback
        print(f"rayapp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
