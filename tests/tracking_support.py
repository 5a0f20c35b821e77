"""Test support for run tracking: a real MLflow tracking server on loopback, and readers of what trackers wrote.

The server (`start_mlflow_server`) is what the `mlflow_server` fixture in conftest.py yields; the readers give a
test the TensorBoard scalars and the W&B offline history of a run without any server.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MlflowServer:
    """An `mlflow server` process on 127.0.0.1 with a SQLite backend; stop it with `stop()`."""

    process: subprocess.Popen
    url: str  # MLFLOW_TRACKING_URI for clients
    backend_uri: str
    artifacts_dir: Path
    log_path: Path

    def client(self):
        """An MlflowClient talking to this server."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def stop(self) -> None:
        """SIGTERM to the server's process group (uvicorn's workers included), SIGKILL after 30 s."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def start_mlflow_server(root: Path, port: int, timeout_s: float = 240) -> MlflowServer:
    """Start `mlflow server` in its own process group, its database and artifacts under `root`; wait for /health."""
    root.mkdir(parents=True, exist_ok=True)
    backend_uri = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = root / "artifacts"
    log_path = root / "server.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    # The server's job runner starts huey consumer processes (and needs huey): nothing here submits jobs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = MlflowServer(process, f"http://127.0.0.1:{port}", backend_uri, artifacts, log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}: {_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return server
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s: {_tail(log_path)}")
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a TensorBoard log directory -> [(step, value), ...] in step order, as TensorBoard
    shows them (points orphaned by a restart are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def read_tensorboard(logdir: str | os.PathLike):
    """A loaded EventAccumulator (images, text) of a TensorBoard log directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def wandb_offline_runs(wandb_parent: str | os.PathLike) -> list[Path]:
    """The `offline-run-*` directories under `<dir>/wandb`, oldest first."""
    return sorted(Path(wandb_parent, "wandb").glob("offline-run-*"))


def read_wandb_run(run_dir: str | os.PathLike) -> dict:
    """An offline W&B run read back from its .wandb log with `wandb leet inspect` (wandb's own reader):
    {"summary": {...}, "history": [{"_step": ..., key: value, ...}, ...]}."""
    wandb = str(Path(sys.executable).with_name("wandb"))
    run_file = next(Path(run_dir).glob("run-*.wandb"))

    def inspect(*flags: str) -> str:
        done = subprocess.run([wandb, "leet", "inspect", *flags, str(run_file)], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"wandb leet inspect {' '.join(flags)} failed: {done.stderr[-2000:]}")
        return done.stdout

    summary = json.loads(inspect("--summary", "--json"))
    history = [json.loads(line)["history"]["item"] for line in inspect("--json").splitlines()
               if line.startswith("{") and json.loads(line).get("type") == "history"]
    return {"summary": summary, "history": history}
