"""Fault injection for the tests, from the test side only (never part of the library or its CLI).

Training faults are update callbacks; the classes travel to the Ray Train workers by value (cloudpickle), so
the workers need not import `tests`. `exit_once_files_exist` kills a driver process the way a lost machine would.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import ray.cloudpickle

from rayapp.runtime.callbacks import UpdateEvent


class KillWorkerOnce:
    """Hard-exits `rank` once when it is about to run update `step` (a lost node or an OOM kill looks the same)."""

    def __init__(self, step: int, marker: str | os.PathLike, rank: int = 1):
        self.step, self.rank, self.marker = step, rank, str(marker)

    def __call__(self, event: UpdateEvent) -> None:
        if event.when == "before" and event.rank == self.rank and event.step == self.step \
                and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)


class StepLog:
    """Rank 0 appends "<pid> <step>" for every finished update, so a test can see what each attempt ran."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def __call__(self, event: UpdateEvent) -> None:
        if event.when == "after" and event.rank == 0:
            with open(self.path, "a") as log:
                log.write(f"{os.getpid()} {event.step}\n")

    def attempts(self) -> list[list[int]]:
        """The updates each process ran, in order of first appearance."""
        runs: dict[str, list[int]] = {}
        for line in Path(self.path).read_text().split("\n"):
            if line:
                pid, step = line.split()
                runs.setdefault(pid, []).append(int(step))
        return list(runs.values())


class ForgeHalfWrittenCheckpoint:
    """Rank 0, before update `step`: copies the newest checkpoint of the run's storage to a new directory that
    claims a later step but lacks one rank's completion marker, as a node lost mid-save would leave it."""

    def __init__(self, step: int, claimed_step: int):
        self.step, self.claimed_step = step, claimed_step

    def __call__(self, event: UpdateEvent) -> None:
        if event.when != "before" or event.rank != 0 or event.step != self.step:
            return
        run_dir = Path(event.storage_path) / event.run_name
        complete = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "trainer_state.json").is_file())
        if not complete or (run_dir / "checkpoint_9999-forged").exists():
            return
        forged = run_dir / "checkpoint_9999-forged"
        shutil.copytree(complete[-1], forged)
        state = json.loads((forged / "trainer_state.json").read_text())
        state["step"] = self.claimed_step
        state["completed_updates"] = list(range(self.claimed_step))
        (forged / "trainer_state.json").write_text(json.dumps(state))
        (forged / "rank_done.1").unlink()


class PauseForTest:
    """Rank 0, after update `step`: touches `signal`, then waits (at most `timeout_s`) until the test touches
    `signal`.go, so the test can set up a fault at an exact point of the run before the next update."""

    def __init__(self, step: int, signal: str | os.PathLike, timeout_s: float = 60):
        self.step, self.signal, self.timeout_s = step, str(signal), timeout_s

    def __call__(self, event: UpdateEvent) -> None:
        if event.when != "after" or event.rank != 0 or event.step != self.step or os.path.exists(self.signal):
            return
        Path(self.signal).touch()
        deadline = time.time() + self.timeout_s
        while not os.path.exists(self.signal + ".go") and time.time() < deadline:
            time.sleep(0.05)


class WorkerPids:
    """Every rank keeps `<directory>/rank<N>.pid` up to date, so a test can kill a given rank's process."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = str(directory)

    def __call__(self, event: UpdateEvent) -> None:
        if event.when == "before":
            path = Path(self.directory) / f"rank{event.rank}.pid"
            path.with_suffix(".tmp").write_text(str(os.getpid()))
            path.with_suffix(".tmp").replace(path)


class MetricsLog:
    """Rank 0 appends each finished update's event metrics as one JSON line (what a custom tracker would see)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def __call__(self, event: UpdateEvent) -> None:
        if event.when == "after" and event.rank == 0:
            with open(self.path, "a") as log:
                log.write(json.dumps({"step": event.step, **event.metrics}) + "\n")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in Path(self.path).read_text().splitlines() if line]


def exit_once_files_exist(directory: str | os.PathLike, pattern: str, count: int, code: int = 17) -> None:
    """Start a thread that hard-exits this process (`os._exit(code)`: no cleanup, no atexit, Ray actors die with
    their driver) once `count` files matching `pattern` exist in `directory`."""

    def watch() -> None:
        while len(list(Path(directory).glob(pattern))) < count:
            time.sleep(0.05)
        os._exit(code)

    threading.Thread(target=watch, daemon=True, name="exit-once-files-exist").start()


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
