"""Shared fixtures: one real local Ray head node per test session, offline Hugging Face, tiny artefacts."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests never touch the network: the hub is unreachable here and in CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Token auth (Ray 2.60 default) breaks the CLI for a cluster started without it; tests use loopback only.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    """A `ray start --head --block` process on loopback, stopped by its PID."""

    process: subprocess.Popen
    gcs_address: str  # for ray.init(address=...)
    dashboard_url: str  # for `ray job submit --address ...`
    temp_dir: str
    env: dict  # environment for CLI subprocesses (`ray job submit`, `serve run`)


def _start_head(logical_cpus: int) -> RayCluster:
    temp_dir = f"/tmp/rayapp-test-{os.getpid()}"
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port",
    )}
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--num-cpus={logical_cpus}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ] + [f"--{name}={port}" for name, port in ports.items()]
    log = open(f"/tmp/rayapp-test-head-{os.getpid()}.log", "w")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    gcs_address = f"127.0.0.1:{ports['port']}"
    dashboard_url = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + 180
    import urllib.request

    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        raise RuntimeError(f"Ray head did not come up in 180 s; see {log.name}")
    env["RAY_ADDRESS"] = gcs_address
    return RayCluster(process, gcs_address, dashboard_url, temp_dir, env)


def _stop_head(cluster: RayCluster) -> None:
    if cluster.process.poll() is None:
        cluster.process.send_signal(signal.SIGTERM)
        try:
            cluster.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cluster.process.pid, signal.SIGKILL)
            cluster.process.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's Ray: a real head node on loopback (8 logical CPUs on 2 cores), this process connected."""
    import ray

    cluster = None
    for attempt in range(2):  # an overloaded machine occasionally fails the first start (ports, dashboard)
        try:
            cluster = _start_head(logical_cpus=8)
            ray.init(address=cluster.gcs_address, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if cluster is not None:
                _stop_head(cluster)
            if attempt == 1:
                raise
    try:
        yield cluster
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        _stop_head(cluster)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A small WordPiece vocabulary written to disk, as tests build for the tiny preset."""
    from rayapp.data.synth import vocabulary
    from rayapp.diffusion.tiny import EXAMPLE_PROMPT_WORDS
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    words = [*vocabulary(), *EXAMPLE_PROMPT_WORDS]
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_wordpiece_tokenizer(words, save_dir=out)
    return out


# --- serve ---
@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny reward model (random weights, fixed seed) written with save_pretrained."""
    import rayapp

    out = tmp_path_factory.mktemp("tiny_rm")
    rayapp.create_model("tiny", tokenizer=tiny_tokenizer_dir, seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny BLIP baseline scorer (random weights, fixed seed): the second model of the session's app."""
    import rayapp

    out = tmp_path_factory.mktemp("tiny_blip")
    rayapp.load_score("BLIP", config="tiny", tokenizer=tiny_tokenizer_dir, seed=1, device="cpu").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def serve_checkpoint_root(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """User checkpoints for model multiplexing: users/run-a, users/run-b, users/run-c (different seeds)."""
    import rayapp

    root = tmp_path_factory.mktemp("checkpoints")
    for seed, name in enumerate(SERVE_TEST_CHECKPOINTS, start=10):
        rayapp.create_model("tiny", tokenizer=tiny_tokenizer_dir, seed=seed).save_pretrained(root / name)
    return root


# Small limits so the bad-input corpus stays cheap; autoscaling delays short enough for a test.
SERVE_TEST_LIMITS = {"max_images": 8, "max_image_bytes": 1 << 20, "max_request_bytes": 2 << 20,
                     "max_pixels": 4_000_000, "max_prompt_chars": 1000, "max_batch_pairs": 256}
SERVE_TEST_AUTOSCALING = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                          "target_ongoing_requests": 2, "upscale_delay_s": 0.5, "downscale_delay_s": 3.0,
                          "metrics_interval_s": 0.5, "look_back_period_s": 1.0}
SERVE_TEST_CHECKPOINTS = ("users/run-a", "users/run-b", "users/run-c")
SERVE_TEST_MAX_USER_MODELS = 2  # LRU size per replica, below the number of checkpoints so one gets evicted


@dataclass
class ServeApp:
    """The reward endpoint running on the session's Ray, reachable at `url` (127.0.0.1)."""

    url: str
    model_dir: Path
    app_name: str
    blip_dir: Path | None = None
    checkpoint_root: Path | None = None


class ServeAppManager:
    """One Serve app for the whole session, redeployed if a test (e.g. `serve shutdown`) took Serve down.

    Two configured models (tiny-test: ImageReward, the default; tiny-blip: BLIP baseline) and multiplexed
    user checkpoints under `checkpoint_root`.
    """

    def __init__(self, model_dir: Path, blip_dir: Path | None = None, checkpoint_root: Path | None = None):
        self.model_dir = model_dir
        self.blip_dir = blip_dir
        self.checkpoint_root = checkpoint_root
        self.app: ServeApp | None = None
        self.port: int | None = None

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.app.url}/healthz", timeout=30) as resp:
                return resp.status == 200
        except OSError:
            return False

    def args(self, **overrides):
        """The session app's AppArgs (tests deploy variants of it, e.g. with a token, under other names)."""
        from rayapp.serve.app import AppArgs

        models = [{"id": "tiny-test", "source": str(self.model_dir)}]
        if self.blip_dir is not None:
            models.append({"id": "tiny-blip", "scorer": "BLIP", "source": str(self.blip_dir)})
        multiplex = None if self.checkpoint_root is None else {
            "checkpoint_root": str(self.checkpoint_root), "max_models_per_replica": SERVE_TEST_MAX_USER_MODELS}
        values = dict(
            models=models, multiplex=multiplex, device="cpu", dtype="float32", num_threads=1,
            max_batch_size=16, batch_wait_timeout_s=0.05, limits=SERVE_TEST_LIMITS,
            scorer_options={"autoscaling_config": SERVE_TEST_AUTOSCALING, "ray_actor_options": {"num_cpus": 1}},
            api_options={"ray_actor_options": {"num_cpus": 0.5}},
        )
        values.update(overrides)
        return AppArgs(**values)

    def ensure(self) -> ServeApp:
        if self.app is not None and self._healthy():
            return self.app
        from ray import serve

        from rayapp.serve.app import build_app

        self.stop()
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(build_app(self.args()), name="rm", route_prefix="/")
        self.app = ServeApp(url=f"http://127.0.0.1:{self.port}", model_dir=self.model_dir, app_name="rm",
                            blip_dir=self.blip_dir, checkpoint_root=self.checkpoint_root)
        return self.app

    def stop(self) -> None:
        """Shut Serve down (one Serve per cluster: a test that runs `serve run` needs it gone)."""
        from ray import serve

        serve.shutdown()
        self.app = None


@pytest.fixture(scope="session")
def serve_manager(ray_cluster, tiny_rm_dir, tiny_blip_dir, serve_checkpoint_root):
    manager = ServeAppManager(tiny_rm_dir, tiny_blip_dir, serve_checkpoint_root)
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture
def serve_app(serve_manager) -> ServeApp:
    """The tiny reward endpoint on a free loopback port (started once, shared by tests/test_serve*.py)."""
    return serve_manager.ensure()


# --- run tracking ---
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend, artifacts in tmp), stopped at session end."""
    from tracking_support import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), free_port())
    try:
        yield server
    finally:
        server.stop()
