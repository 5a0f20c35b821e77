"""A Ray cluster of three network hosts on this machine (head + 2 workers, each in its own network namespace):
jobs with their workers on both worker hosts, Serve with replicas on two hosts, and whole hosts lost mid-run.

The cluster is scripts/local_cluster.sh's (driven by tests/netns_cluster.py), one per module: head 1 CPU,
workers 2 CPUs each. Jobs are submitted from the root namespace to the head's dashboard, as a user would, and
reserve the head's CPU for their driver (`--entrypoint-num-cpus 1` pinned to the head), so what the job
starts -- train workers, Ray Data tasks, scoring actors -- runs on the worker hosts. Storage shared by path
is only the checkpoint directory (under /tmp, which every namespace sees).

Recovery times measured here are printed (`-s` shows them) and written up in docs/CLUSTER.md.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from netns_cluster import (
    VENV_BIN,
    NetnsCluster,
    RayJob,
    cli_env,
    free_subnet,
    http_json,
    netns_unavailable_reason,
    session_name,
    stop_process_group,
    submit_job,
    sweep_stale_namespaces,
    wait_until,
)

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None,
                                reason=netns_unavailable_reason() or "")

WORKER_IPS_LINE = re.compile(r"\[workers\] node IPs: ([0-9.]+(?:, [0-9.]+)*)")
JOB_TIMEOUT_S = 420


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def worker_ip_lines(output: str) -> list[list[str]]:
    """Every `[workers] node IPs: a, b` line of a job's output, in order (one per worker-group start)."""
    return [match.group(1).split(", ") for match in WORKER_IPS_LINE.finditer(output)]


def head_pinned_driver(cluster: NetnsCluster) -> list[str]:
    """`ray job submit` flags that run the driver on the head and reserve the head's CPU for it."""
    return ["--entrypoint-num-cpus", "1",
            "--entrypoint-resources", json.dumps({f"node:{cluster.head_ip}": 0.001})]


def checkpoint_states(run_dir: Path) -> list[dict]:
    """trainer_state.json of every complete checkpoint in a run's storage dir (all rank markers present)."""
    states = []
    for directory in sorted(run_dir.glob("checkpoint_*")):
        try:
            state = json.loads((directory / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        ranks = state.get("world_size", 1)
        if state.get("finished") or all((directory / f"rank_done.{r}").exists() for r in range(ranks)):
            states.append(state)
    return states


def final_state(run_dir: Path) -> dict:
    """The state of the run's last checkpoint (the finished export if there is one)."""
    states = checkpoint_states(run_dir)
    assert states, f"no complete checkpoint under {run_dir}: {sorted(p.name for p in run_dir.glob('*'))}"
    return max(states, key=lambda s: (bool(s.get("finished")), s.get("step", -1)))


def update_history(state: dict) -> list[int]:
    """The 0-based indices of the updates that made the final weights, in order."""
    for key in ("history", "completed_updates"):
        if key in state:
            return list(state[key])
    raise AssertionError(f"trainer_state.json has no step history; keys: {sorted(state)}")


@dataclass
class NodeLossRun:
    """A training job during which one worker host was killed and a replacement host started."""

    job: RayJob
    exit_code: int
    output: str
    killed_node: str
    killed_ip: str
    replacement_ip: str
    state_at_kill: dict  # newest complete checkpoint when the node was killed
    final: dict  # trainer_state.json of the final checkpoint
    worker_ips_before: list[str]
    seconds: dict = field(default_factory=dict)  # measured times, see run_with_node_loss


def run_with_node_loss(cluster: NetnsCluster, name: str, entrypoint: list[str], run_dir: Path,
                       log_dir: Path, *, kill_after_step: int) -> NodeLossRun:
    """Submit `entrypoint`; once a complete checkpoint past `kill_after_step` exists, kill the worker host of
    rank 1 and start a replacement; wait for the job. Times are from the kill (monotonic seconds)."""
    job = submit_job(cluster.dashboard_url, entrypoint, log_dir / f"{name}.log",
                     submission_id=f"{cluster.name}-{name}-{int(time.time())}",
                     extra_args=head_pinned_driver(cluster))
    try:
        return _observe_node_loss(cluster, name, job, run_dir, kill_after_step)
    except BaseException:
        stop_process_group(job.process, grace_s=5)  # the CLI tailing the job; the job goes with the cluster
        raise


def _observe_node_loss(cluster: NetnsCluster, name: str, job: RayJob, run_dir: Path,
                       kill_after_step: int) -> NodeLossRun:
    started = time.monotonic()

    def checkpointed():
        if job.process.poll() is not None:
            raise AssertionError(f"{name} ended (exit {job.process.returncode}) before a checkpoint at update "
                                 f">= {kill_after_step} appeared:\n{job.output()[-6000:]}")
        states = [s for s in checkpoint_states(run_dir) if not s.get("finished")]
        done = [s for s in states if s.get("step", 0) >= kill_after_step]
        return max(done, key=lambda s: s["step"]) if done else None

    state_at_kill = wait_until(checkpointed, JOB_TIMEOUT_S, interval=0.2, what=f"{name}'s first checkpoint")
    ips_before = worker_ip_lines(job.output())[0]
    by_ip = {cluster.ip(node): node for node in cluster.node_names()}
    victim = by_ip[ips_before[1]]
    t_kill = cluster.kill_node(victim)
    seconds = {"to_first_checkpoint": t_kill - started}
    replacement = cluster.add_worker()
    seconds["replacement_alive"] = time.monotonic() - t_kill

    def restarted():
        if len(worker_ip_lines(job.output())) > 1:
            return True
        return job.process.poll() is not None

    wait_until(restarted, JOB_TIMEOUT_S, interval=0.5, what=f"{name}'s worker-group restart")
    seconds["workers_restarted"] = time.monotonic() - t_kill
    exit_code = job.wait(JOB_TIMEOUT_S)
    seconds["job_end"] = time.monotonic() - t_kill
    output = job.output()
    print(f"\n[{name}] killed {victim} ({cluster.ip(victim)}) after checkpoint at update {state_at_kill['step']}; "
          f"seconds after the kill: {', '.join(f'{k} {v:.1f}' for k, v in seconds.items())}")
    return NodeLossRun(job, exit_code, output, victim, cluster.ip(victim), cluster.ip(replacement),
                       state_at_kill, final_state(run_dir) if exit_code == 0 else {}, ips_before, seconds)


def assert_resumed_without_lost_or_repeated_updates(run: NodeLossRun, total_steps: int) -> None:
    """The job succeeded after the node loss, resumed once from a checkpoint, and every update counts once."""
    assert run.exit_code == 0, f"the job failed after the node loss:\n{run.output[-8000:]}"
    assert update_history(run.final) == list(range(total_steps)), (
        f"updates lost or repeated: {update_history(run.final)}")
    assert run.final.get("step") == total_steps
    # Restores from a checkpoint: one lost host, one restart (a group that failed to start never restores).
    assert run.final.get("restarts") == 1, f"restart count {run.final.get('restarts')} (expected 1: one lost host)"
    groups = worker_ip_lines(run.output)
    assert len(groups) >= 2, f"no second worker group after the node loss:\n{run.output[-6000:]}"
    assert run.killed_ip not in groups[-1], f"a worker still placed on the killed host: {groups}"


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + 2 worker hosts (2 CPUs each), each in its own network namespace; removed afterwards."""
    sweep_stale_namespaces("rt")
    name = session_name("rt")
    netns = NetnsCluster(name, free_subnet(os.getpid()), workers=2, head_cpus=1, worker_cpus=2)
    netns.up()
    try:
        yield netns
    finally:
        netns.down()


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """Shared-by-path storage (checkpoints, outputs, job logs): /tmp is the same directory on every host."""
    return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def sample_images() -> list[bytes]:
    """Three small PNGs (different colours)."""
    from PIL import Image

    images = []
    for colour in ("red", "blue", "green"):
        buffer = io.BytesIO()
        Image.new("RGB", (48, 40), colour).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


# ---------------------------------------------------------------------------------------------------------
# item 1 + 2: reward-model training across hosts, then a host lost mid-run
# ---------------------------------------------------------------------------------------------------------
RM_STEPS = 16


@pytest.fixture(scope="module")
def rm_run(cluster, work_dir) -> NodeLossRun:
    """jobs/train_rm.py, 2 workers SPREAD, checkpoints every 4 updates; rank 1's host dies after the first."""
    out = work_dir / "rm"
    entrypoint = [
        "python", "jobs/train_rm.py", "--output-dir", str(out), "--storage-path", str(work_dir / "rm-storage"),
        "--run-name", "rm", "--num-workers", "2", "--placement-strategy", "SPREAD", "--max-steps", str(RM_STEPS),
        "--checkpoint-every", "4", "--max-failures", "3", "--synth-prompts", "40", "--synth-per-prompt", "4",
        "--log-every", "4", "--no-eval",
    ]
    return run_with_node_loss(cluster, "train_rm", entrypoint, work_dir / "rm-storage" / "rm", work_dir,
                              kill_after_step=4)


def test_train_rm_job_puts_one_worker_on_each_worker_host(cluster, rm_run):
    worker_hosts = {cluster.ip("w1"), cluster.ip("w2")}
    assert len(set(rm_run.worker_ips_before)) == 2, rm_run.worker_ips_before
    assert set(rm_run.worker_ips_before) == worker_hosts, (
        f"workers on {rm_run.worker_ips_before}, expected one on each of {sorted(worker_hosts)}")


def test_train_rm_resumes_after_losing_a_host(rm_run):
    assert_resumed_without_lost_or_repeated_updates(rm_run, RM_STEPS)


# ---------------------------------------------------------------------------------------------------------
# ReFL across hosts, then a host lost mid-run
# ---------------------------------------------------------------------------------------------------------
REFL_STEPS = 12


@pytest.fixture(scope="module")
def refl_run(cluster, work_dir) -> NodeLossRun:
    """jobs/refl.py, 2 workers SPREAD, checkpoints every 2 updates; rank 1's host dies after the first."""
    entrypoint = [
        "python", "jobs/refl.py", "--output-dir", str(work_dir / "refl"),
        "--storage-path", str(work_dir / "refl-storage"), "--run-name", "refl", "--num-workers", "2",
        "--placement-strategy", "SPREAD", "--max-steps", str(REFL_STEPS), "--pretrain-weight", "0",
        "--eval-every", "0", "--checkpoint-every", "2", "--max-failures", "3",
    ]
    return run_with_node_loss(cluster, "refl", entrypoint, work_dir / "refl-storage" / "refl", work_dir,
                              kill_after_step=2)


def test_refl_job_puts_one_worker_on_each_worker_host(cluster, refl_run):
    alive_workers = {ip for ip in cluster.all_nodes().values() if ip != cluster.head_ip}
    assert len(set(refl_run.worker_ips_before)) == 2, refl_run.worker_ips_before
    assert cluster.head_ip not in refl_run.worker_ips_before
    assert set(refl_run.worker_ips_before) <= alive_workers


def test_refl_resumes_after_losing_a_host(refl_run):
    assert_resumed_without_lost_or_repeated_updates(refl_run, REFL_STEPS)


# ---------------------------------------------------------------------------------------------------------
# batch scoring: Ray Data actors on both worker hosts
# ---------------------------------------------------------------------------------------------------------
def test_score_dataset_runs_actors_on_both_worker_hosts(cluster, work_dir, tiny_rm_dir):
    from rayapp.data.synth import write_synthetic_set

    data = work_dir / "score-data"
    write_synthetic_set(data, prompts=80, per_prompt=3, seed=3, progress=False, overwrite=True)
    worker_ips = {ip for ip in cluster.alive_nodes().values() if ip != cluster.head_ip}
    job = submit_job(cluster.dashboard_url, [
        "python", "jobs/score_dataset.py", "--input", str(data / "test"), "--output", str(work_dir / "scores"),
        "--scorer", str(tiny_rm_dir), "--tokenizer", str(data / "tokenizer"), "--concurrency", "2",
        "--rows-per-block", "2", "--no-progress", "--overwrite",
    ], work_dir / "score.log", submission_id=f"{cluster.name}-score-{int(time.time())}",
        extra_args=head_pinned_driver(cluster))
    assert job.wait(JOB_TIMEOUT_S) == 0, job.output()[-6000:]
    assert list((work_dir / "scores").glob("part-*.parquet")), "no output parts written"

    ray_job_id = http_json(f"{cluster.dashboard_url}/api/jobs/{job.submission_id}")["job_id"]
    actors = [a for a in cluster.actors(job_id=ray_job_id) if "ScoreActor" in a.get("class_name", "")]
    nodes = cluster.all_nodes()
    actor_ips = sorted(nodes.get(a.get("node_id"), "?") for a in actors)
    assert len(actors) == 2, f"expected 2 scoring actors, found {[a.get('class_name') for a in actors]}"
    assert set(actor_ips) == worker_ips, f"scoring actors on {actor_ips}, worker hosts are {sorted(worker_ips)}"


# ---------------------------------------------------------------------------------------------------------
# Serve: 2 replicas on 2 hosts, HTTP through two proxies, then the host of one replica lost under load
# ---------------------------------------------------------------------------------------------------------
def serve_config(model_dir: Path) -> dict:
    """serve_configs/rm_cpu_local.yaml's structure, for a cluster: every proxy listens on its host's address,
    and both deployments run 2 replicas, at most one per host (losing one host leaves one of each)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 60},
        "applications": [{
            "name": "rm", "route_prefix": "/", "import_path": "rayapp.serve.app:build_app",
            "args": {"model": str(model_dir), "name": "multihost-rm", "device": "cpu", "dtype": "float32",
                     "num_threads": 1},
            "deployments": [
                {"name": "RewardScorer", "num_replicas": 2, "max_replicas_per_node": 1,
                 "max_ongoing_requests": 16, "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
                 "ray_actor_options": {"num_cpus": 1}},
                {"name": "RewardAPI", "num_replicas": 2, "max_replicas_per_node": 1,
                 "ray_actor_options": {"num_cpus": 0}},
            ],
        }],
    }


def replicas(cluster: NetnsCluster, deployment: str) -> list[dict]:
    """Serve's view of a deployment's replicas (state, node_ip) from the head's REST API."""
    details = http_json(f"{cluster.dashboard_url}/api/serve/applications/", timeout=10)
    app = (details.get("applications") or {}).get("rm") or {}
    return ((app.get("deployments") or {}).get(deployment) or {}).get("replicas") or []


def running_replica_ips(cluster: NetnsCluster, deployment: str) -> list[str]:
    try:
        return sorted(r["node_ip"] for r in replicas(cluster, deployment) if r.get("state") == "RUNNING")
    except (OSError, ValueError, KeyError):
        return []


def score_over_http(host: str, prompt: str, images: list[bytes], timeout: float = 30) -> list[float]:
    body = json.dumps({"prompt": prompt, "images": [base64.b64encode(i).decode() for i in images]}).encode()
    reply = http_json(f"http://{host}:8000/v1/score", timeout=timeout, data=body,
                      headers={"Content-Type": "application/json"})
    return reply["scores"]


@pytest.fixture(scope="module")
def serve_app(cluster, work_dir, tiny_rm_dir):
    """`serve run CONFIG` on the head host (a driver needs a Ray node), until both deployments run 2 replicas.

    Defined after the jobs' tests so that it starts after them (file order): replicas hold CPUs workers need.
    """
    import yaml

    config = work_dir / "serve_multihost.yaml"
    config.write_text(yaml.safe_dump(serve_config(tiny_rm_dir), sort_keys=False))
    with open(work_dir / "serve_run.log", "w") as log:
        process = subprocess.Popen(
            [*cluster.in_namespace("head"), str(VENV_BIN / "serve"), "run", "--address",
             cluster.gcs_address, str(config)],
            env=cli_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        started = time.monotonic()
        wait_until(lambda: len(running_replica_ips(cluster, "RewardScorer")) == 2
                   and len(running_replica_ips(cluster, "RewardAPI")) == 2, 240, interval=2,
                   what="2 RewardScorer + 2 RewardAPI replicas RUNNING")
        print(f"\n[serve] both deployments running 2 replicas after {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        stop_process_group(process, grace_s=3)  # the module's cluster teardown removes Serve with the hosts


def test_serve_replicas_on_two_hosts_score_through_head_and_worker_proxies(serve_app, tiny_rm_dir,
                                                                           sample_images):
    import rayapp

    cluster = serve_app
    scorer_ips = running_replica_ips(cluster, "RewardScorer")
    assert len(set(scorer_ips)) == 2, f"both model replicas on one host: {scorer_ips}"
    worker_proxy = next(ip for ip in scorer_ips if ip != cluster.head_ip)  # a host with a replica has a proxy
    prompt = "two small red circles on a white background"
    expected = rayapp.load(str(tiny_rm_dir), device="cpu").score(prompt, list(sample_images))
    for host in (cluster.head_ip, worker_proxy):
        got = score_over_http(host, prompt, sample_images)
        assert got == pytest.approx(expected, abs=1e-4), f"scores through {host}'s proxy"


class LoadClients:
    """Bounded HTTP load: `n` threads each sending one request at a time through one proxy, every outcome kept."""

    def __init__(self, host: str, images: list[bytes], n: int = 3):
        self.host, self.images, self.n = host, images, n
        self.lock = threading.Lock()
        self.in_flight = 0
        self.outcomes: list[tuple[float, float, bool, str]] = []  # (start, end, ok, error)
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self) -> None:
        while not self.stop_flag.is_set():
            with self.lock:
                self.in_flight += 1
            start, ok, error = time.monotonic(), True, ""
            try:
                score_over_http(self.host, "a red circle", self.images[:2], timeout=60)
            except Exception as err:  # noqa: BLE001 -- every failure is counted, whatever its kind
                ok, error = False, f"{type(err).__name__}: {err}"[:300]
            with self.lock:
                self.in_flight -= 1
                self.outcomes.append((start, time.monotonic(), ok, error))

    def start(self) -> LoadClients:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        for thread in self.threads:
            thread.join(timeout=90)


def test_serve_loses_only_in_flight_requests_when_a_replica_host_dies(serve_app, sample_images):
    cluster = serve_app
    scorer_ips = running_replica_ips(cluster, "RewardScorer")
    by_ip = {cluster.ip(node): node for node in cluster.node_names()}
    victim = next(by_ip[ip] for ip in scorer_ips if ip != cluster.head_ip)
    victim_ip = cluster.ip(victim)
    load = LoadClients(cluster.head_ip, sample_images).start()
    try:
        time.sleep(5)  # steady state first
        with load.lock:
            in_flight_at_kill = load.in_flight
            t_kill = cluster.kill_node(victim)
        replacement = cluster.add_worker()
        t_replacement = time.monotonic() - t_kill
        wait_until(lambda: len(running_replica_ips(cluster, "RewardScorer")) == 2
                   and victim_ip not in running_replica_ips(cluster, "RewardScorer"), 240, interval=1,
                   what="the lost RewardScorer replica replaced")
        t_back = time.monotonic() - t_kill
        time.sleep(5)  # the replaced replica serves traffic
    finally:
        load.stop()
    before = [o for o in load.outcomes if o[0] < t_kill]
    failures = [o for o in load.outcomes if not o[2]]
    after_ok = [o for o in load.outcomes if o[0] > t_kill and o[2]]
    first_ok_after = min((o[1] for o in after_ok), default=float("nan")) - t_kill
    print(f"\n[serve] RewardScorer replicas on {scorer_ips}, then {running_replica_ips(cluster, 'RewardScorer')}; "
          f"RewardAPI replicas now on {running_replica_ips(cluster, 'RewardAPI')}")
    print(f"[serve] killed {victim} ({victim_ip}); replacement {replacement} alive after {t_replacement:.1f} s; "
          f"2 RUNNING replicas again after {t_back:.1f} s; {len(load.outcomes)} requests "
          f"({len(before)} before the kill), {len(failures)} failed, {in_flight_at_kill} in flight at the kill; "
          f"first success completed {first_ok_after:.1f} s after the kill; failures: "
          f"{sorted({f[3] for f in failures})[:5]}")
    assert before and all(o[2] for o in before if o[1] < t_kill), "requests failed before the kill"
    assert after_ok, "no request succeeded after the kill"
    sent_after = [f for f in failures if f[0] > t_kill]
    assert not sent_after, f"{len(sent_after)} requests sent after the host died failed: {sent_after[:5]}"
    assert len(failures) <= in_flight_at_kill, (
        f"{len(failures)} requests failed, only {in_flight_at_kill} were in flight when the host died: "
        f"{[f[3] for f in failures][:10]}")
