"""Run tracking on rank 0: TensorBoard, MLflow and Weights & Biases behind one small interface.

As Ray's experiment-tracking guide does it, the tracker lives inside the train function on rank 0 only; the
driver checks the backends' packages (`check_available`) and hands the tracker settings of its own environment
to that worker (`tracking_env`), because a worker of an already running cluster does not inherit it.

- tensorboard: event files under `<run_dir>/tensorboard` (torch's SummaryWriter).
- mlflow: the client API against MLFLOW_TRACKING_URI; without one, a SQLite store at `<run_dir>/mlflow.db`
  (MLflow's own default would land in the Ray worker's scratch directory). The experiment is
  MLFLOW_EXPERIMENT_ID, else MLFLOW_EXPERIMENT_NAME, else the job's name (e.g. "rayapp-rm").
- wandb: `wandb.init` in `<run_dir>` (or WANDB_DIR); WANDB_MODE=offline, WANDB_PROJECT (default: the job's
  name), WANDB_ENTITY and the API key are read by wandb itself.

Failures: a tracker that cannot start (package missing, server unreachable, bad credentials) raises
`TrackingError` from `RunTracker(...)`, before the first update, so a misconfigured run stops at once and says
why. Once started, an error while logging (a server that restarts, a network blip, a deleted run) is logged as a
warning (the first, the 10th, the 100th, ... of each backend) and the training run goes on; the metrics of that
call are lost for that backend only.

Resuming: `state()` gives the backends' run ids; a worker group restarted after a failure passes it back as
`resume=` and goes on in the same MLflow and W&B runs. Steps logged after the last checkpoint are logged again:
TensorBoard drops the orphaned ones (a SessionLog START at the first step after the restart), MLflow keeps both
values of such a step, W&B ignores steps below its last one.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow", "wandb")
INSTALL_HINT = 'pip install "rayapp[tracking]"'
# The module each backend imports, and what else the default MLflow store (SQLite) needs.
_PACKAGES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow",), "wandb": ("wandb",)}
_SQL_STORE_PACKAGES = ("sqlalchemy", "alembic")
# Settings the backends read from the environment. WANDB_SERVICE is the address of a wandb process on the
# driver's machine: meaningless anywhere else.
ENV_PREFIXES = ("MLFLOW_", "WANDB_", "DATABRICKS_")
_PROCESS_LOCAL_ENV = frozenset({"WANDB_SERVICE"})
# MLflow's limits (mlflow.utils.validation): longer keys and values are refused by the server.
MLFLOW_MAX_KEY = 250
MLFLOW_MAX_PARAM_VALUE = 6000
MLFLOW_MAX_TAG_VALUE = 8000
MLFLOW_PARAMS_PER_BATCH = 100
MLFLOW_METRICS_PER_BATCH = 1000


class TrackingError(RuntimeError):
    """A tracker could not be used: its package is missing or it could not start."""


def parse_tracking(value: str | Sequence[str]) -> tuple[str, ...]:
    """Tracker names from a comma list ("tensorboard,mlflow") or a sequence; "none" or "" give ()."""
    items = value.split(",") if isinstance(value, str) else [part for item in value for part in str(item).split(",")]
    names = [item.strip().lower() for item in items if item.strip()]
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"tracking {','.join(names)!r}: 'none' cannot be combined with a tracker")
        return ()
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker(s) {', '.join(unknown)}: choose from {', '.join(TRACKERS)} or none")
    return tuple(dict.fromkeys(names))


def tracking_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tracker settings set in this (the driver's) environment, to be applied on the rank-0 worker.

    Values may include credentials (MLFLOW_TRACKING_PASSWORD, WANDB_API_KEY): pass them on, never print them.
    """
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items()
            if key.startswith(ENV_PREFIXES) and key not in _PROCESS_LOCAL_ENV}


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a broken install or a stub module without a spec
        return True


def check_available(names: str | Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Raise TrackingError naming the missing packages of the chosen trackers (imports none of them)."""
    names = parse_tracking(names)
    env = tracking_env() if env is None else env
    missing = {}
    for name in names:
        modules = list(_PACKAGES[name])
        if name == "mlflow" and _uses_sql_store(env.get("MLFLOW_TRACKING_URI")):
            modules += _SQL_STORE_PACKAGES
        absent = [module for module in modules if _missing(module)]
        if absent:
            missing[name] = absent
    if missing:
        listed = "; ".join(f"{name} needs {', '.join(modules)}" for name, modules in missing.items())
        raise TrackingError(f"--tracking {','.join(missing)}: not installed ({listed}). Install them with "
                            f"{INSTALL_HINT}, or choose other trackers (--tracking none turns tracking off)")


def _uses_sql_store(uri: str | None) -> bool:
    """Whether MLflow would open a database itself (the default store, or a sqlite/postgres/... URI)."""
    if not uri:
        return True
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    return scheme in ("sqlite", "postgresql", "mysql", "mssql")


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"}: strings as they are, lists and tuples as JSON, the rest with str()."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, str):
            out[name] = value
        elif isinstance(value, (Mapping, list, tuple)):
            out[name] = json.dumps(_jsonable(value))
        else:
            out[name] = str(value)
    return out


def _jsonable(value):
    """A JSON-encodable copy: tuples become lists, objects JSON does not know become their str()."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    number = as_number(value)
    return number if number is not None else str(value)


def as_number(value) -> float | None:
    """A metric value as float: int, float, bool and numpy scalars (0-d arrays too); None for anything else."""
    if isinstance(value, numbers.Real):  # int, float, bool, numpy integer and floating scalars
        return float(value)
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if kind in ("b", "i", "u", "f") and getattr(value, "ndim", None) == 0:  # numpy bool_ and 0-d arrays
        return float(value)
    return None


class _Context:
    """What every backend gets at start."""

    def __init__(self, run_dir: str, run_name: str, job: str, params: Mapping, resume: Mapping):
        self.run_dir = os.path.abspath(run_dir)
        self.run_name = run_name
        self.job = job
        self.params = params
        self.resume = resume


class _TensorBoard:
    """Scalars, PNG images and text as TensorBoard event files under <run_dir>/tensorboard."""

    name = "tensorboard"

    def __init__(self, ctx: _Context):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = os.path.join(ctx.run_dir, "tensorboard")
        # flush_secs: someone following the run sees new points within seconds, not the default 2 minutes
        self.writer = SummaryWriter(log_dir=self.logdir, flush_secs=10)
        # A restarted worker group logs again the steps after its checkpoint: TensorBoard drops the earlier points
        # of those steps when a SessionLog START marks the restart, at the first step logged after it. A new run
        # marks step 0, so points of an attempt that failed before its first checkpoint go too.
        self.restart_pending = bool(ctx.resume.get("tensorboard_logdir"))
        if not self.restart_pending:
            self._mark_start(0)
            self.writer.add_text("config", "```json\n" + json.dumps(_jsonable(ctx.params), indent=2) + "\n```", 0)

    def _mark_start(self, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))

    def state(self) -> dict:
        return {"tensorboard_logdir": self.logdir}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.restart_pending:
            self._mark_start(step)
            self.restart_pending = False
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_artifact(self, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        for file, tag in _files(path):
            if file.suffix.lower() == ".png":
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def log_text(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(key, text, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    """One MLflow run through the client API: params, metric histories, artifacts, status."""

    name = "mlflow"

    def __init__(self, ctx: _Context):
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ctx.run_dir}/mlflow.db"
        if self.uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.uri[len("sqlite:///"):]) or ".", exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        run_id = ctx.resume.get("mlflow_run_id")
        if run_id:
            logged = self.client.get_run(run_id).data.params
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {"rayapp.job": ctx.job, "rayapp.run_dir": ctx.run_dir}
            run_id = self.client.create_run(self._experiment(ctx), run_name=ctx.run_name, tags=tags).info.run_id
            logged = {}
        self.run_id = run_id
        self._log_params(flatten_params(ctx.params), logged)

    def _experiment(self, ctx: _Context) -> str:
        from mlflow.exceptions import MlflowException

        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or ctx.job
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise TrackingError(f"MLflow experiment {name!r} is deleted: restore it or set "
                                    "MLFLOW_EXPERIMENT_NAME to another name")
            return experiment.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            # Without a server the artifacts would go to ./mlruns, the Ray worker's scratch directory.
            db_dir = os.path.dirname(os.path.abspath(self.uri[len("sqlite:///"):]))
            location = Path(db_dir, "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            experiment = self.client.get_experiment_by_name(name)  # another run created it meanwhile
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_params(self, params: dict[str, str], logged: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        todo, changed, cut = [], [], []
        for key, value in params.items():
            key = _mlflow_key(key)[:MLFLOW_MAX_KEY]
            if len(value) > MLFLOW_MAX_PARAM_VALUE:
                cut.append(key)
                value = value[:MLFLOW_MAX_PARAM_VALUE - 3] + "..."
            if key in logged:
                if logged[key] != value:
                    changed.append(key)  # MLflow params cannot change: the resumed run keeps its first values
                continue
            todo.append(Param(key, value))
        if cut:
            logger.warning("tracking: mlflow params cut to %d characters: %s", MLFLOW_MAX_PARAM_VALUE, ", ".join(cut))
        if changed:
            logger.warning("tracking: mlflow run %s keeps its first values of the changed params %s", self.run_id,
                           ", ".join(changed))
        for start in range(0, len(todo), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=todo[start:start + MLFLOW_PARAMS_PER_BATCH])

    def state(self) -> dict:
        return {"mlflow_run_id": self.run_id}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(key), value, now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), MLFLOW_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start:start + MLFLOW_METRICS_PER_BATCH])

    def log_artifact(self, path: Path, step: int) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def log_text(self, key: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{key}.txt")
        if len(text) <= MLFLOW_MAX_TAG_VALUE:  # also on the run's page, without opening the artifact
            self.client.set_tag(self.run_id, _mlflow_key(key), text)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _mlflow_key(key: str) -> str:
    """A metric/param name MLflow accepts (alphanumerics, _ - . space : /)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


class _WandB:
    """One W&B run: config, history, images and files, summary text."""

    name = "wandb"

    def __init__(self, ctx: _Context):
        import wandb

        self.wandb = wandb
        settings = {}
        if "WANDB_CONSOLE" not in os.environ:
            settings["console"] = "off"  # leave the Ray worker's stdout alone: Ray forwards it to the job's console
        kwargs = {"project": os.environ.get("WANDB_PROJECT") or ctx.job,
                  "name": os.environ.get("WANDB_NAME") or ctx.run_name,
                  "reinit": "create_new",  # a new run even if this process still holds one
                  "settings": wandb.Settings(**settings)}
        if not os.environ.get("WANDB_DIR"):
            os.makedirs(ctx.run_dir, exist_ok=True)
            kwargs["dir"] = ctx.run_dir
        run_id = ctx.resume.get("wandb_run_id")
        if run_id:
            self.run = wandb.init(id=run_id, resume="allow", **kwargs)
            self.run.config.update(_jsonable(ctx.params), allow_val_change=True)
        else:
            self.run = wandb.init(config=_jsonable(ctx.params), **kwargs)

    def state(self) -> dict:
        return {"wandb_run_id": self.run.id}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_artifact(self, path: Path, step: int) -> None:
        images = {}
        base = path.parent
        for file, tag in _files(path):
            # A copy in the run's files directory: the original (e.g. inside a checkpoint) may be gone before
            # an online run has uploaded it.
            copy = Path(self.run.dir, file.relative_to(base))
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, copy)
            self.run.save(str(copy), base_path=self.run.dir, policy="now", glob=False)
            if file.suffix.lower() == ".png":
                images[tag] = self.wandb.Image(str(copy))
        if images:
            self.run.log(images, step=step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.run.summary[key] = text

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def _files(path: Path):
    """(file, tag) for a file, or for every file under a directory; tag: the path without suffix."""
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            yield file, f"{path.name}/{file.relative_to(path).with_suffix('').as_posix()}"
    else:
        yield path, path.stem


class RunTracker:
    """The chosen trackers of one run, on rank 0: params at start, then metrics, artifacts, text; `close` ends it.

    A context manager: leaving the block by an exception closes the runs as failed.
    """

    def __init__(self, names: str | Sequence[str], *, run_dir: str, run_name: str, job: str, params: dict,
                 env: dict | None = None, resume: dict | None = None):
        self.names = parse_tracking(names)
        self._closed = False
        self._failures: dict[tuple[str, str], int] = {}
        self._step = 0
        self._backends: list = []
        # The driver's settings win over the worker's own; restored at close (a test's process lives on).
        self._saved_env = {key: os.environ.get(key) for key in (env or {})}
        os.environ.update(env or {})
        ctx = _Context(run_dir, run_name, job, params, dict(resume or {}))
        for name in self.names:
            try:
                self._backends.append(_BACKENDS[name](ctx))
            except Exception as error:
                self.close(failed=True)
                hint = f" ({INSTALL_HINT})" if isinstance(error, ImportError) else ""
                raise TrackingError(f"tracking: {name} could not start: {type(error).__name__}: {error}{hint}") \
                    from error

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def state(self) -> dict:
        """The backends' run ids (JSON-able), for `resume=` after a restart."""
        out = {}
        for backend in self._backends:
            out.update(backend.state())
        return out

    def log_metrics(self, metrics: Mapping, step: int) -> None:
        """Log the numeric values of `metrics` at `step`; other values are skipped."""
        numbers_only = {}
        for key, value in metrics.items():
            number = as_number(value)
            if number is not None:
                numbers_only[str(key)] = number
        self._step = step
        if numbers_only:
            self._each("log_metrics", numbers_only, step)

    def log_artifact(self, path: str) -> None:
        """A file or a directory: PNGs become images (TensorBoard, W&B); all files are kept (MLflow, W&B)."""
        path = Path(path)
        if not path.exists():
            logger.warning("tracking: artifact %s does not exist; not logged", path)
            return
        self._each("log_artifact", path, self._step)

    def log_text(self, key: str, text: str) -> None:
        """A short text (e.g. the export's path): TensorBoard text, an MLflow tag and file, the W&B summary."""
        self._each("log_text", key, str(text), self._step)

    def close(self, failed: bool = False) -> None:
        """End every run (MLflow status FAILED when `failed`); the second call does nothing."""
        if self._closed:
            return
        self._closed = True
        for backend in reversed(self._backends):
            self._call(backend, "close", failed)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def _each(self, operation: str, *args) -> None:
        if self._closed:
            logger.warning("tracking: %s after close is ignored", operation)
            return
        for backend in self._backends:
            self._call(backend, operation, *args)

    def _call(self, backend, operation: str, *args) -> None:
        try:
            getattr(backend, operation)(*args)
        except Exception as error:  # noqa: BLE001 -- any backend error mid-run must not end the training run
            key = (backend.name, operation)
            count = self._failures[key] = self._failures.get(key, 0) + 1
            if math.log10(count).is_integer():  # the 1st, 10th, 100th, ...: visible, not a flood
                logger.warning("tracking: %s %s failed (%d time(s) so far); the run goes on: %s: %s", backend.name,
                               operation, count, type(error).__name__, error)
