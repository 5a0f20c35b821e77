"""One shape for a command that is both a `rayapp` sub-command and a job script (`jobs/*.py`): the same flags and
the same run function, whichever way it is started."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class JobCommand:
    """A command's name, help line, description, flags and run function (`run(args, parser) -> exit status`)."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]

    def build_parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        """The stand-alone parser a job script uses."""
        parser = argparse.ArgumentParser(prog=prog, description=self.description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(parser)
        return parser

    def main(self, argv: list[str] | None = None, prog: str | None = None) -> int:
        """Parse `argv` (default: sys.argv) and run; the job script's entry point."""
        parser = self.build_parser(prog)
        return self.run(parser.parse_args(argv), parser)

    def register(self, subparsers) -> None:
        """Add the command to the `rayapp` parser."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(parser)
        parser.set_defaults(func=lambda args: self.run(args, parser))
