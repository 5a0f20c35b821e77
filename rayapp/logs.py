"""Logging set-up for the jobs and command lines (library modules only call `logging.getLogger(__name__)`)."""
from __future__ import annotations

import logging
import os
import sys
import warnings

RAY_DATA_QUIET_CONFIG = os.path.join(os.path.dirname(__file__), "runtime", "ray_data_logging.yaml")
# Libraries whose INFO/WARNING chatter a user of the jobs cannot act on; `--verbose` lets it through.
NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "deepspeed", "DeepSpeed", "torch.distributed",
                 "transformers", "diffusers", "filelock", "urllib3", "httpx")
# Warnings third-party code raises about its own internals, on every run: (category, message regex, module regex).
# Only these are ignored, and only without `--verbose`; any other warning, and every warning rayapp raises, shows.
KNOWN_WARNINGS = (
    # Ray Data's tuning hint when an operator gets fewer input blocks than its task limit (small data sets).
    (UserWarning, r"The maximum number of concurrent tasks for .* is set to", r"ray\.data\."),
    # Ray Train's own data setup still sets the option Ray Data deprecates.
    (DeprecationWarning, r"`ExecutionOptions\.exclude_resources` is deprecated", r"ray\.data\."),
    # DeepSpeed's ZeRO collectives call the torch API that torch deprecates.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated", r"torch\.distributed\."),
)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (a CLI called in-process, e.g. by a test,
    must not keep a stream that is later replaced and closed). Also Ray Data's console handler in the jobs."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def setup_logging(verbose: bool = False) -> None:
    """rayapp's INFO lines to stderr as plain text; the noisy libraries at ERROR (INFO with `verbose`).

    Also sets the verbosity variables transformers and diffusers read, for processes started after this call.
    """
    root = logging.getLogger("rayapp")
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_QUIET_CONFIG)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        ignore_known_warnings()


def ignore_known_warnings() -> None:
    """Ignore the KNOWN_WARNINGS in this process (idempotent: `warnings` drops a filter it already has)."""
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_ray_process() -> None:
    """Ray `worker_process_setup_hook`: Ray Data in this process logs errors only to the console, and the
    KNOWN_WARNINGS stay out of it.

    Ray Data configures its loggers from RAY_DATA_LOGGING_CONFIG when first imported, after this hook runs.
    Ray Train's controller configures its own loggers when it starts: its level comes from the run's
    `LoggingConfig` (rayapp.runtime.checkpoints.run_config).
    """
    os.environ["RAY_DATA_LOGGING_CONFIG"] = RAY_DATA_QUIET_CONFIG
    ignore_known_warnings()
