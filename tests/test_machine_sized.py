"""Runs sized like the machine: the README's cluster commands against a real `ray start --head` whose CPU count
is this machine's (os.cpu_count(), not padded), as a user on a small box meets them.

Train workers and Ray Data stages must not starve each other on those CPUs, a request no node can ever
meet must fail at once with a message, and the offline Serve config must come up, both on that cluster and
as a script with its own local Ray. As root each runs in a private network namespace (its own loopback:
Serve's fixed port 8000 and Ray's 6379 / 8265 cannot collide with anything else on this machine); otherwise
on the host's loopback with free ports.

`checkout` stands for the repository root after the main job: serve_configs/rm_cpu_local.yaml (a copy) and a
trained model at runs/rm/model (the tiny one). The head is started from it, as a user starts `ray start
--head` in the repository, so the config's relative model path means the same to the cluster's workers.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from netns_cluster import (
    REPO_ROOT,
    VENV_BIN,
    LoopbackHead,
    PrivateLoopback,
    cli_env,
    session_name,
    stop_process_group,
    submit_job,
    sweep_stale_namespaces,
    wait_until,
)

JOB_TIMEOUT_S = 480
HEALTHZ_DEADLINE_S = 120


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, tiny_rm_dir) -> Path:
    """A stand-in for the repository root after the main job (see the module docstring)."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "serve_configs").mkdir()
    shutil.copy(REPO_ROOT / "serve_configs" / "rm_cpu_local.yaml", root / "serve_configs")
    shutil.copytree(tiny_rm_dir, root / "runs" / "rm" / "model")
    return root


@pytest.fixture(scope="module")
def head(checkout):
    """`ray start --head --num-cpus=<os.cpu_count()>` on 127.0.0.1, stopped by its process group afterwards."""
    sweep_stale_namespaces("ms")
    machine_head = LoopbackHead(session_name("ms"), cwd=checkout).start()
    try:
        yield machine_head
    finally:
        machine_head.stop()


def run_job(head: LoopbackHead, name: str, entrypoint: list[str], log_dir: Path,
            timeout: float = JOB_TIMEOUT_S) -> tuple[int, str, float]:
    """`ray job submit --address <head> --working-dir <repo> -- <entrypoint>`: (exit code, output, seconds)."""
    started = time.monotonic()
    job = submit_job(head.dashboard_url, entrypoint, log_dir / f"{name}.log",
                     submission_id=f"{head.name}-{name}-{int(time.time())}", runner=head.runner)
    code = job.wait(timeout)
    return code, job.output(), time.monotonic() - started


def test_head_has_the_machines_cpu_count(head):
    import json

    def nodes() -> list[dict]:
        code, body = head.get(f"{head.dashboard_url}/api/v0/nodes?detail=true", timeout=20)
        return json.loads(body)["data"]["result"]["result"] if code == 200 else []

    registered = wait_until(nodes, 60, interval=2, what="the head in Ray's node table")
    assert [n["resources_total"].get("CPU") for n in registered] == [float(os.cpu_count())]


def test_train_rm_job_finishes_on_a_machine_sized_head(head, tmp_path):
    out = tmp_path / "rm"
    code, output, seconds = run_job(head, "train_rm", [
        "python", "jobs/train_rm.py", "--output-dir", str(out), "--synth-prompts", "60", "--max-steps", "6",
        "--no-eval"], tmp_path)
    print(f"\n[machine-sized] train_rm (6 updates) finished in {seconds:.0f} s")
    assert code == 0, output[-8000:]
    assert (out / "model").is_dir() and (out / "official").is_dir()


def test_refl_job_finishes_on_a_machine_sized_head(head, tmp_path):
    """With the pre-training loss on (its Ray Data pipeline runs beside the 2 train workers): the case that
    used to wait forever for a CPU."""
    code, output, seconds = run_job(head, "refl", [
        "python", "jobs/refl.py", "--output-dir", str(tmp_path / "refl"), "--max-steps", "2"], tmp_path)
    print(f"\n[machine-sized] refl (2 updates) finished in {seconds:.0f} s")
    assert code == 0, output[-8000:]
    assert "mean held-out reward after" in output


def test_gpu_request_fails_fast_on_a_cpu_only_cluster(head, tmp_path):
    code, output, seconds = run_job(head, "train_rm_gpu", [
        "python", "jobs/train_rm.py", "--output-dir", str(tmp_path / "gpu"), "--synth-prompts", "20",
        "--max-steps", "1", "--use-gpu", "true"], tmp_path, timeout=240)
    print(f"\n[machine-sized] a GPU asked of a CPU-only cluster: exit {code} after {seconds:.0f} s")
    assert code != 0, "a job asking for GPUs on a cluster without any succeeded?"
    assert seconds < 120, f"took {seconds:.0f} s to give up: it should fail at once"
    assert "GPU" in output and "never" in output, output[-4000:]


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def serve_run_until_healthy(place: PrivateLoopback, checkout: Path, env: dict, log_path: Path) -> float:
    """`serve run serve_configs/rm_cpu_local.yaml` from `checkout`; seconds until GET /healthz is 200.

    Fails after HEALTHZ_DEADLINE_S with serve run's output; stops serve run (its process group) either way.
    """
    if not place.namespace and _port_taken(8000):
        pytest.skip("port 8000 (the config's) is taken on this host's loopback, and no namespace without root")
    with open(log_path, "w") as log:
        process = subprocess.Popen([*place.runner, str(VENV_BIN / "serve"), "run", "serve_configs/rm_cpu_local.yaml"],
                                   cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    started = time.monotonic()
    try:
        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve run exited ({process.returncode}):\n{log_path.read_text()[-6000:]}")
            return place.get("http://127.0.0.1:8000/healthz", timeout=5)[0] == 200

        try:
            wait_until(healthy, HEALTHZ_DEADLINE_S, interval=2, what="GET /healthz == 200")
        except TimeoutError as err:
            raise AssertionError(f"{err}; serve run output:\n{log_path.read_text()[-6000:]}") from None
        return time.monotonic() - started
    finally:
        stop_process_group(process, grace_s=20)


def test_serve_offline_config_on_the_machine_sized_cluster(head, checkout, tmp_path):
    seconds = serve_run_until_healthy(head, checkout, cli_env(RAY_ADDRESS=head.gcs_address),
                                      tmp_path / "serve_run.log")
    head.run([str(VENV_BIN / "serve"), "shutdown", "-y", "--address", head.dashboard_url], timeout=60,
             env=cli_env())
    print(f"\n[machine-sized] serve run on the cluster: /healthz 200 after {seconds:.0f} s")


def test_serve_offline_config_as_a_script_answers_healthz(checkout, tmp_path):
    """`serve run` with no cluster running: it starts its own local Ray, sized by Ray to this machine.

    RAY_ADDRESS=local and a private RAY_TMPDIR stand for a machine where no other Ray runs (here others do,
    and `serve run` would otherwise attach to one of them).
    """
    place = PrivateLoopback(f"{session_name('ms')}-s").open()
    ray_tmp = Path(f"/tmp/rls-{os.getpid()}")  # short: Ray's socket paths under it must stay < 108 bytes
    try:
        seconds = serve_run_until_healthy(place, checkout, cli_env(RAY_ADDRESS="local", RAY_TMPDIR=str(ray_tmp)),
                                          tmp_path / "serve_run.log")
    finally:
        place.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"\n[machine-sized] serve run as a script: /healthz 200 after {seconds:.0f} s")
