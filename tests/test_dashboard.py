"""The Ray dashboard follows a job's training run: its Train API lists the run with workers and state (issue 18)."""
from __future__ import annotations

import sys
import time

import pytest
import requests
from conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(600)

TRAIN_RUNS = "/api/train/v2/runs/v1"  # Ray 2.60's Train v2 route (ray/dashboard/modules/train/train_head.py)


def _run_of(dashboard_url: str, submission_id: str) -> dict | None:
    """The Train API's run for this job submission, or None while the API has none (or no state actor yet)."""
    response = requests.get(dashboard_url + TRAIN_RUNS, timeout=30)
    if response.status_code != 200:  # 500 "Train state data is not available" until the run creates the actor
        return None
    for run in response.json()["train_runs"]:
        if (run.get("job_details") or {}).get("submission_id") == submission_id:
            return run
    return None


def _workers(run: dict) -> list[dict]:
    return run["attempts"][-1]["workers"] if run["attempts"] else []


def test_dashboard_train_api_lists_a_running_jobs_run(ray_cluster, tmp_path):
    """Submit a small jobs/train_rm.py run (the head has no Train setting of its own: the job turns tracking on);
    while it trains, the dashboard lists its run RUNNING with both workers; once the job succeeds, FINISHED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    entrypoint = (f"{sys.executable} jobs/train_rm.py --synth-prompts 100 --output-dir {tmp_path / 'out'} "
                  "--max-steps 6 --log-every 1 --num-workers 2 --no-eval")
    job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO_ROOT)})
    try:
        running = None
        deadline = time.time() + 480
        while running is None and time.time() < deadline:
            run = _run_of(ray_cluster.dashboard_url, job)
            if run and run["status"] == "RUNNING" and len(_workers(run)) == 2:
                running = run
            elif client.get_job_status(job).is_terminal():
                break
            else:
                time.sleep(1)
        logs = client.get_job_logs(job)
        assert running is not None, f"the Train API never listed the run RUNNING with 2 workers:\n{logs[-4000:]}"
        assert sorted(w["world_rank"] for w in _workers(running)) == [0, 1]
        assert all(w["status"] == "ALIVE" and w["pid"] > 0 for w in _workers(running)), _workers(running)
        assert running["name"].startswith("rm-"), running["name"]

        while not client.get_job_status(job).is_terminal() and time.time() < deadline:
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-4000:]
        final = _run_of(ray_cluster.dashboard_url, job)
        assert final is not None and final["status"] == "FINISHED", final
        # the job said where the dashboard is (this head runs without token auth: the plain address)
        assert f"Ray dashboard: {ray_cluster.dashboard_url}" in logs, logs[-4000:]
    finally:
        if not client.get_job_status(job).is_terminal():
            client.stop_job(job)
            stop_deadline = time.time() + 60
            while not client.get_job_status(job).is_terminal() and time.time() < stop_deadline:
                time.sleep(1)


def test_dashboard_hint_names_where_the_token_is(monkeypatch, tmp_path):
    """With token auth on, the line names the token's source in Ray's order; without it, just the address."""
    from rayapp.runtime.cluster import dashboard_hint

    url = "http://127.0.0.1:8265"
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert dashboard_hint(url) == f"Ray dashboard: {url}"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert dashboard_hint(url) == f"Ray dashboard: {url}"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "~/.ray/auth_token" in dashboard_hint(url) and "ray get-auth-token" in dashboard_hint(url)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert str(tmp_path / "token") in dashboard_hint(url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-value")
    hint = dashboard_hint(url)
    assert "RAY_AUTH_TOKEN environment variable" in hint and "secret-value" not in hint
