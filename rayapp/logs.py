"""Logging set-up for the jobs and command lines (library modules only call `logging.getLogger(__name__)`)."""
from __future__ import annotations

import logging
import os
import sys

# Libraries whose INFO/WARNING chatter a user of the jobs cannot act on; `--verbose` lets it through.
NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "deepspeed", "DeepSpeed", "torch.distributed",
                 "transformers", "diffusers", "filelock", "urllib3", "httpx")


def setup_logging(verbose: bool = False) -> None:
    """rayapp's INFO lines to stderr as plain text; other libraries at WARNING (ERROR unless verbose).

    Also sets the environment variables Ray workers and DeepSpeed read, so that worker processes started
    after this call stay as quiet as the driver.
    """
    root = logging.getLogger("rayapp")
    if not any(getattr(h, "_rayapp", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._rayapp = True
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        os.environ.setdefault("RAYAPP_QUIET", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")


def quiet_worker_logs() -> None:
    """In a Ray worker: apply the driver's quiet setting (RAYAPP_QUIET travels in the runtime env)."""
    if os.environ.get("RAYAPP_QUIET") == "1":
        setup_logging(verbose=False)
    else:
        setup_logging(verbose=True)
