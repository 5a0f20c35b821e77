"""The shipped Serve configs: schema-valid, and `serve run` of the offline one answers over HTTP."""
from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.timeout(300)
CONFIGS = REPO_ROOT / "serve_configs"


def png_b64(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(48, 72, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("name", ["rm.yaml", "rm_cpu_local.yaml"])
def test_config_is_valid(name):
    from ray.serve.schema import ServeDeploySchema

    from rayapp.serve.app import AppArgs

    config = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / name).read_text()))
    (app,) = config.applications
    assert app.import_path == "rayapp.serve.app:build_app"
    args = AppArgs.model_validate(app.args)  # unknown keys (typos) are errors
    assert {d.name for d in app.deployments} == {"RewardScorer", "RewardAPI"}
    scorer = next(d for d in app.deployments if d.name == "RewardScorer")
    assert set(scorer.user_config) == {"max_batch_size", "batch_wait_timeout_s"}
    if name == "rm.yaml":
        assert args.model == "ImageReward-v1.0" and args.device == "cuda" and args.dtype == "bfloat16"
        auto = scorer.autoscaling_config
        assert auto["min_replicas"] < auto["max_replicas"] and auto["target_ongoing_requests"] > 0
        assert scorer.ray_actor_options.num_gpus == 1
    else:
        assert args.device == "cpu"


def test_serve_run_offline_config(ray_cluster, tiny_rm_dir, tmp_path):
    import rayapp

    port = free_port()
    config = yaml.safe_load((CONFIGS / "rm_cpu_local.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    config["applications"][0]["args"]["model"] = str(tiny_rm_dir)
    path = tmp_path / "rm_cpu_local.yaml"
    path.write_text(yaml.safe_dump(config))

    bin_dir = Path(sys.executable).parent
    log = open(tmp_path / "serve_run.log", "w")
    proc = subprocess.Popen([str(bin_dir / "serve"), "run", str(path)], env=ray_cluster.env, cwd=REPO_ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, f"serve run exited {proc.returncode}: {(tmp_path / 'serve_run.log').read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"serve run never became healthy: {(tmp_path / 'serve_run.log').read_text()[-3000:]}")

        images = [png_b64(i) for i in range(3)]
        resp = requests.post(f"{url}/v1/score", json={"prompt": "a red circle", "images": images}, timeout=60)
        assert resp.status_code == 200, resp.text
        expected = rayapp.load(tiny_rm_dir, device="cpu").score("a red circle", [base64.b64decode(i) for i in images])
        np.testing.assert_allclose(resp.json()["scores"], expected, rtol=1e-4, atol=1e-5)
        assert resp.json()["model"] == "rayapp-rm-local"
    finally:
        # ENVIRONMENT.md: a background `serve run` ignores SIGINT; shut Serve down, then SIGTERM its PID.
        subprocess.run([str(bin_dir / "serve"), "shutdown", "-y", "-a", ray_cluster.dashboard_url],
                       env=ray_cluster.env, timeout=120, capture_output=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            pytest.fail("serve run did not stop on SIGTERM")
        log.close()
    with pytest.raises(requests.RequestException):
        requests.get(f"{url}/healthz", timeout=5)
