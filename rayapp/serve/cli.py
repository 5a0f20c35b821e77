"""`rayapp serve`: run a Ray Serve reward endpoint from a shipped config (package data) or a config file, the
way `serve run CONFIG` does: it starts or joins Ray, deploys, and blocks until Ctrl-C, which shuts Serve down.

    rayapp serve --config rm_cpu_local --model runs/rm/model     # a trained tiny model on CPU, 127.0.0.1:8000
    rayapp serve --config rm --port 8080                         # ImageReward-v1.0 on a GPU
    rayapp serve --config my_serve.yaml --address auto           # an own config, on the running cluster
    rayapp serve --config rm_cpu_local --print-config            # the YAML it would run, then exit

The shipped configs live in rayapp/serve/configs/ (the repository's serve_configs/ holds the same files).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from rayapp.job_command import JobCommand

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "rm_cpu_local"


def shipped_configs() -> dict[str, Path]:
    """The serve configs shipped with the package, by name (file name without .yaml)."""
    return {path.stem: path for path in sorted(CONFIGS_DIR.glob("*.yaml"))}


def config_path(name_or_file: str) -> Path:
    """A shipped config's file for its name, else the given YAML file; anything else is a clear error."""
    shipped = shipped_configs()
    if name_or_file in shipped:
        return shipped[name_or_file]
    path = Path(name_or_file).expanduser()
    if path.is_file():
        return path
    raise ValueError(f"--config {name_or_file!r} is neither a shipped config ({', '.join(shipped)}) nor a file")


def _local_or_uri(source: str) -> str:
    """An existing local path made absolute (the replicas may start elsewhere); names and URIs unchanged."""
    from rayapp.data.storage import is_uri

    path = Path(source).expanduser()
    return source if is_uri(source) or not path.exists() else os.fspath(path.resolve())


def resolved_config(args: argparse.Namespace) -> tuple[Path, dict | None]:
    """(the config file, the overridden config or None when no flag changes it)."""
    import yaml

    path = config_path(args.config)
    if args.model is None and args.host is None and args.port is None:
        return path, None
    config = yaml.safe_load(path.read_text()) or {}
    if args.host is not None or args.port is not None:
        http = config.setdefault("http_options", {})
        if args.host is not None:
            http["host"] = args.host
        if args.port is not None:
            http["port"] = args.port
    if args.model is not None:
        apps = config.get("applications") or []
        if len(apps) != 1:
            raise ValueError(f"--model needs a config with one application; {path} has {len(apps)}")
        app_args = apps[0].setdefault("args", {})
        for several in ("models", "default_model"):
            app_args.pop(several, None)
        app_args["model"] = _local_or_uri(args.model)
    return path, config


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run `serve run` on the resolved config in this process (blocking), or print it with --print-config."""
    import tempfile

    import yaml

    path, config = resolved_config(args)
    if args.print_config:
        print(path.read_text() if config is None else yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    written = None
    if config is not None:
        handle, written = tempfile.mkstemp(prefix=f"rayapp-serve-{path.stem}-", suffix=".yaml")
        with os.fdopen(handle, "w") as out:
            yaml.safe_dump(config, out, sort_keys=False)
    # Ray's own `serve` command, so the config runs exactly as under `serve run` (see rayapp.ray_compat for why)
    from rayapp.ray_compat import run_serve_cli

    command = ["run", written or os.fspath(path)] + (["--address", args.address] if args.address else [])
    try:
        run_serve_cli(command)
    finally:
        if written:
            os.unlink(written)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rayapp serve`'s flags."""
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="NAME|FILE",
                        help=f"a shipped config ({', '.join(shipped_configs())}) or a Serve config YAML file "
                             "(default: %(default)s)")
    parser.add_argument("--model", help="serve this checkpoint instead of the config's models: a save_pretrained dir, "
                                        "ImageReward.pt, a known name, owner/repo or a URI (hf://, s3://, ...)")
    parser.add_argument("--host", help="HTTP host (default: the config's http_options.host)")
    parser.add_argument("--port", type=int, help="HTTP port (default: the config's http_options.port)")
    parser.add_argument("--address", help="Ray cluster to deploy on (default: RAY_ADDRESS, a running local Ray, "
                                          "else a new local one)")
    parser.add_argument("--print-config", action="store_true", help="print the config it would run and exit")


COMMAND = JobCommand("serve", "run a Ray Serve reward endpoint (like `serve run CONFIG`)", __doc__, add_arguments, run)
build_parser, main, register = COMMAND.build_parser, COMMAND.main, COMMAND.register
