"""Serve configs sized like the machine, and requests no node can meet refused at build time (issue 12, item 3)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import REPO_ROOT, free_port
from test_serve import b64, png_bytes

pytestmark = pytest.mark.timeout(420)

CONFIGS = REPO_ROOT / "serve_configs"
BIN = Path(sys.executable).parent


def config_demands(name: str):
    """What a shipped config's deployments ask for, as the builder computes it (code defaults + YAML)."""
    from ray.serve.schema import ServeDeploySchema

    from rayapp.serve.api import RewardAPI
    from rayapp.serve.app import _demand
    from rayapp.serve.scorer import RewardScorer

    (app,) = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / name).read_text())).applications
    overrides = {d.name: d.model_dump(exclude_unset=True) for d in app.deployments}
    return [_demand(name, dep, overrides.get(name, {}))
            for name, dep in {"RewardScorer": RewardScorer, "RewardAPI": RewardAPI}.items()]


def test_offline_config_fits_two_cpus_and_production_needs_gpus():
    from rayapp.serve.resources import find_problems

    two_cpus = [{"CPU": 2.0, "memory": 8 * 2**30, "object_store_memory": 2**30, "node:127.0.0.1": 1.0}]
    assert find_problems(config_demands("rm_cpu_local.yaml"), two_cpus) == []
    (problem,) = find_problems(config_demands("rm.yaml"), two_cpus)
    assert "RewardScorer" in problem and "GPU 1" in problem and "CPU 2" in problem, problem
    gpu_node = [{"CPU": 8.0, "GPU": 1.0, "memory": 32 * 2**30}]
    assert find_problems(config_demands("rm.yaml"), gpu_node) == []


def test_replicas_that_only_fit_one_at_a_time_are_refused():
    from rayapp.serve.resources import DeploymentDemand, find_problems

    # The old offline config: 2 CPUs for the model and 1 for the ingress on a 2-CPU machine.
    old = [DeploymentDemand("RewardScorer", {"CPU": 2.0}, 1), DeploymentDemand("RewardAPI", {"CPU": 1.0}, 1)]
    (problem,) = find_problems(old, [{"CPU": 2.0}])
    assert "do not fit" in problem and "RewardScorer: 1 x {CPU 2}" in problem
    # Two 1-CPU nodes cannot hold a 2-CPU replica even though the cluster has 2 CPUs in all.
    (problem,) = find_problems([DeploymentDemand("RewardScorer", {"CPU": 2.0}, 1)], [{"CPU": 1.0}, {"CPU": 1.0}])
    assert "no node" in problem
    assert find_problems([DeploymentDemand("RewardScorer", {"CPU": 1.0}, 2)], [{"CPU": 1.0}, {"CPU": 1.0}]) == []


def test_builder_refuses_a_gpu_on_a_cpu_cluster(serve_manager):
    from rayapp.serve.app import build_app
    from rayapp.serve.resources import UnschedulableError

    args = serve_manager.args(scorer_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}})
    started = time.time()
    with pytest.raises(UnschedulableError) as err:
        build_app(args)
    assert time.time() - started < 30
    message = str(err.value)
    assert "RewardScorer" in message and "GPU 1" in message and "CPU 8" in message, message
    # warn mode deploys anyway (for clusters whose nodes join later without an autoscaler)
    build_app(serve_manager.args(scorer_options={"ray_actor_options": {"num_gpus": 1}},
                                 resource_check={"mode": "warn"}))


# ---- the README's offline serve command on a Ray with the machine's real core count --------------------

def _start_small_head(tmp_path: Path, cpus: int) -> tuple[subprocess.Popen, dict, str]:
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                                            "object-manager-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = f"/tmp/rayapp-2cpu-{os.getpid()}"
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        + [f"--{name}={port}" for name, port in ports.items()],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
        try:
            if requests.get(f"{dashboard}/api/version", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(1)
    else:
        pytest.fail("the 2-CPU head did not come up")
    env["RAY_ADDRESS"] = f"127.0.0.1:{ports['port']}"
    return head, env, dashboard


def _stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_offline_config_is_healthy_on_a_two_cpu_head(tiny_rm_dir, tmp_path):
    cpus = min(2, os.cpu_count() or 2)
    head, env, dashboard = _start_small_head(tmp_path, cpus)
    port = free_port()
    config = yaml.safe_load((CONFIGS / "rm_cpu_local.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    config["applications"][0]["args"]["model"] = str(tiny_rm_dir)
    path = tmp_path / "rm_cpu_local.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "serve_run.log"
    serve_run = None
    try:
        with open(log_path, "w") as log:
            serve_run = subprocess.Popen([str(BIN / "serve"), "run", str(path)], env=env, cwd=REPO_ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        started, healthy = time.time(), False
        while time.time() - started < 120 and not healthy:
            assert serve_run.poll() is None, log_path.read_text()[-3000:]
            try:
                healthy = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            except requests.RequestException:
                time.sleep(1)
        assert healthy, f"not healthy within 120 s on {cpus} CPUs: {log_path.read_text()[-3000:]}"
        resp = requests.post(f"http://127.0.0.1:{port}/v1/score_batch", timeout=60,
                             json={"prompts": ["a red circle"], "images": [b64(png_bytes(1))]})
        assert resp.status_code == 200 and resp.json()["model"] == "rayapp-rm-local", resp.text
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "-a", dashboard], env=env, timeout=120,
                       capture_output=True, check=False)
        if serve_run is not None:
            _stop(serve_run)
        _stop(head)
