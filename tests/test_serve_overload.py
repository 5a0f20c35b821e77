"""Backpressure and model updates on real endpoints over HTTP on 127.0.0.1.

- A small model queue refuses fast: every request is scored or answered 503 + Retry-After in under a second, and
  the retrying clients end with the library's scores.
- `serve deploy` of a new checkpoint on the running app under steady load drops no request, and each response
  names the weights digest that scored it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from test_serve import png_bytes

from rayapp.serve import wire

pytestmark = pytest.mark.timeout(300)

OVERLOAD_APP, OVERLOAD_PREFIX = "rm-overload", "/overload"
ROLLING_APP, ROLLING_PREFIX = "rm-rolling", "/rolling"
CLIENTS = 48  # concurrent clients against one replica with room for 1 ongoing + 2 queued requests
FAST_S = 1.0  # a refusal must come back within this


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_png(seed: int) -> bytes:
    return png_bytes(seed, (32, 32))


def post_pair(session: requests.Session, url: str, prompt: str, image: bytes, timeout: float = 30):
    return session.post(f"{url}/v1/score_batch", data=wire.encode_pairs([prompt], [image]), timeout=timeout,
                        headers={"Content-Type": wire.CONTENT_TYPE})


@pytest.fixture(scope="module")
def overload_url(serve_manager):
    """The tiny model behind a queue of 2: one replica, one request at a time, each ~0.1 s (batch wait)."""
    from ray import serve

    from rayapp.serve.app import build_app

    serve_manager.ensure()
    args = serve_manager.args(
        models=[{"id": "tiny-test", "source": str(serve_manager.model_dir)}], multiplex=None,
        max_batch_size=4, batch_wait_timeout_s=0.1,
        scorer_options={"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 2,
                        "backpressure_config": {"retry_after_s": 1}, "ray_actor_options": {"num_cpus": 0.25}},
        api_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
    )
    serve.run(build_app(args), name=OVERLOAD_APP, route_prefix=OVERLOAD_PREFIX)
    try:
        yield f"http://127.0.0.1:{serve_manager.port}{OVERLOAD_PREFIX}"
    finally:
        serve.delete(OVERLOAD_APP)


def test_full_queue_is_refused_fast_and_retried_clients_get_library_scores(overload_url, serve_manager):
    import rayapp
    from rayapp.serve.client import AsyncRewardClient, make_reward_fn

    images = [small_png(3000 + i) for i in range(CLIENTS)]
    prompts = [f"{n} red circles" for n in range(CLIENTS)]
    post_pair(requests.Session(), overload_url, prompts[0], images[0]).raise_for_status()  # warm: model info cached

    # 1. Many clients at once, no retries: each request is scored, or refused with Retry-After within a second.
    #    Health and model listing keep answering meanwhile (a busy replica is a healthy one).
    start = threading.Barrier(CLIENTS + 2)

    def meanwhile(path: str) -> int:
        session = requests.Session()
        start.wait(timeout=30)
        return session.get(f"{overload_url}{path}", timeout=30).status_code

    def once(i: int) -> tuple[int, float, str | None]:
        session = requests.Session()
        start.wait(timeout=30)
        began = time.perf_counter()
        resp = post_pair(session, overload_url, prompts[i], images[i])
        return resp.status_code, time.perf_counter() - began, resp.headers.get("Retry-After")

    with ThreadPoolExecutor(CLIENTS + 2) as pool:
        side = [pool.submit(meanwhile, path) for path in ("/healthz", "/v1/models")]
        answers = list(pool.map(once, range(CLIENTS)))
    assert [future.result() for future in side] == [200, 200]
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    refused = [(seconds, retry_after) for status, seconds, retry_after in answers if status == 503]
    assert refused and statuses.count(200) >= 1, f"the queue never filled: {statuses}"
    assert all(retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
               for _, retry_after in refused), refused
    print(f"{statuses.count(200)} scored, {len(refused)} refused; slowest refusal "
          f"{max(seconds for seconds, _ in refused):.3f} s, slowest answer {max(s for _, s, _ in answers):.3f} s")
    slow = sorted(seconds for seconds, _ in refused if seconds >= FAST_S)
    assert not slow, f"{len(slow)} of {len(refused)} refusals took >= {FAST_S} s: {slow[-3:]}"

    # 2. The same load through the clients, which honour Retry-After: every request ends scored, as the library.
    expected = rayapp.load(serve_manager.model_dir, device="cpu").score_pairs(prompts, images)

    async def concurrently() -> list[list[float]]:
        async with AsyncRewardClient(overload_url, max_retries=40, max_connections=CLIENTS,
                                     max_pairs_per_request=1) as client:
            return await asyncio.gather(*[client.score_batch([p], [img]) for p, img in zip(prompts, images)])

    scored = asyncio.run(concurrently())
    np.testing.assert_allclose([s for (s,) in scored], expected, rtol=1e-4, atol=1e-5)
    half = CLIENTS // 2
    with make_reward_fn(overload_url, max_retries=40, max_connections=half, max_pairs_per_request=1) as reward_fn, \
            ThreadPoolExecutor(half) as pool:
        synced = list(pool.map(lambda i: reward_fn([images[i]], [prompts[i]])[0], range(half)))
    np.testing.assert_allclose(synced, expected[:half], rtol=1e-4, atol=1e-5)


class _Overloaded(BaseHTTPRequestHandler):
    """Always 503 with Retry-After: 1; records when each request came."""

    arrivals: list[float] = []

    def do_POST(self):  # noqa: N802 -- http.server's naming
        type(self).arrivals.append(time.monotonic())
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"detail": "the model's request queue is full", "field": None}).encode()
        self.send_response(503)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_clients_wait_retry_after_then_give_up_with_a_clear_error():
    from rayapp.serve.client import AsyncRewardClient, RewardClient, RewardServiceError, make_reward_fn

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Overloaded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    async def async_score():
        async with AsyncRewardClient(url, max_retries=1, retry_backoff_s=0.01, max_pairs_per_request=4) as client:
            return await client.score_batch(["a"], [small_png(1)])

    def sync_fn():
        with make_reward_fn(url, max_retries=1, retry_backoff_s=0.01, max_pairs_per_request=4) as reward_fn:
            return reward_fn([small_png(1)], ["a"])

    try:
        for call in (lambda: asyncio.run(async_score()), sync_fn,
                     lambda: RewardClient(url, max_retries=1, retry_backoff_s=0.01).score_batch(["a"], [small_png(1)])):
            _Overloaded.arrivals = []
            with pytest.raises(RewardServiceError) as err:
                call()
            assert err.value.status == 503 and "gave up after 2 tries" in str(err.value), str(err.value)
            gaps = np.diff(_Overloaded.arrivals)
            # Retry-After: 1 is honoured (the tiny retry_backoff_s would retry at once); jitter stays below 2x.
            assert len(gaps) == 1 and all(1.0 <= gap < 2.5 for gap in gaps), gaps
    finally:
        server.shutdown()


# ---- a rolling model update under load ---------------------------------------------------------------------

def _rolling_config(port: int, source: Path) -> dict:
    scorer = {"name": "RewardScorer", "num_replicas": 1, "max_ongoing_requests": 8, "max_queued_requests": 16,
              "backpressure_config": {"retry_after_s": 1}, "max_surge_percent": 100,
              "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
              "ray_actor_options": {"num_cpus": 0.25}}
    api = {"name": "RewardAPI", "num_replicas": 1, "max_surge_percent": 100, "ray_actor_options": {"num_cpus": 0.25}}
    return {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [{
        "name": ROLLING_APP, "route_prefix": ROLLING_PREFIX, "import_path": "rayapp.serve.app:build_app",
        "args": {"models": [{"id": "tiny-rolling", "source": str(source)}], "device": "cpu", "dtype": "float32",
                 "num_threads": 1},
        "deployments": [scorer, api]}]}


def _serve_deploy(cluster, config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([str(Path(sys.executable).with_name("serve")), "deploy", str(path), "-a",
                           cluster.dashboard_url], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _digest_serving(url: str) -> str | None:
    try:
        resp = requests.get(f"{url}/version", timeout=10)
    except requests.RequestException:
        return None
    return resp.json()["models"][0]["weights_sha256"] if resp.status_code == 200 else None


class SteadyLoad:
    """`clients` threads scoring the same pairs over and over until stopped (or `max_requests` in all)."""

    def __init__(self, url: str, clients: int, max_requests: int, prompts: list[str], images: list[bytes]):
        self.url, self.max_requests, self.prompts, self.images = url, max_requests, prompts, images
        self.answers: list[tuple[float, int, str | None, list[float] | str]] = []
        self.stopped = threading.Event()
        self.pool = ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._client) for _ in range(clients)]

    def _client(self) -> None:
        session = requests.Session()
        body = wire.encode_pairs(self.prompts, self.images)
        while not self.stopped.is_set() and len(self.answers) < self.max_requests:
            try:
                resp = session.post(f"{self.url}/v1/score_batch", data=body, timeout=60,
                                    headers={"Content-Type": wire.CONTENT_TYPE})
                data = resp.json() if resp.status_code == 200 else {}
                answer = (time.monotonic(), resp.status_code, data.get("weights_sha256"),
                          data.get("scores", resp.text[:200]))
            except requests.RequestException as err:
                answer = (time.monotonic(), -1, None, repr(err))
            self.answers.append(answer)

    def digests(self) -> list[str | None]:
        return [digest for _, _, digest, _ in sorted(self.answers, key=lambda a: a[0])]

    def stop(self) -> None:
        self.stopped.set()
        self.pool.shutdown(wait=True)


def test_serve_deploy_of_a_new_checkpoint_under_load_drops_no_request(ray_cluster, serve_manager,
                                                                        serve_checkpoint_root, tmp_path):
    from ray import serve

    import rayapp

    serve_manager.ensure()
    url = f"http://127.0.0.1:{serve_manager.port}{ROLLING_PREFIX}"
    old_dir, new_dir = serve_manager.model_dir, serve_checkpoint_root / "users" / "run-c"
    old, new = sha256(old_dir / "model.safetensors"), sha256(new_dir / "model.safetensors")
    assert old != new
    prompts = ["a red circle", "two blue squares"]
    images = [small_png(4000), small_png(4001)]
    expected = {old: rayapp.load(old_dir, device="cpu").score_pairs(prompts, images),
                new: rayapp.load(new_dir, device="cpu").score_pairs(prompts, images)}
    load = None
    try:
        _serve_deploy(ray_cluster, _rolling_config(serve_manager.port, old_dir), tmp_path / "old.yaml")
        deadline = time.time() + 120
        while _digest_serving(url) != old and time.time() < deadline:
            time.sleep(1)
        assert _digest_serving(url) == old, "the first deploy never served"

        load = SteadyLoad(url, clients=3, max_requests=3000, prompts=prompts, images=images)
        time.sleep(2)
        _serve_deploy(ray_cluster, _rolling_config(serve_manager.port, new_dir), tmp_path / "new.yaml")
        deadline = time.time() + 120
        while time.time() < deadline and not (load.digests()[-6:] == [new] * 6 or load.stopped.is_set()):
            time.sleep(0.5)
        time.sleep(1)
        load.stop()
    finally:
        if load is not None:
            load.stop()
        serve.delete(ROLLING_APP)

    print(f"{len(load.answers)} requests during the update: {load.digests().count(old)} by the old weights, "
          f"{load.digests().count(new)} by the new")
    failures = [(status, body) for _, status, _, body in load.answers if status != 200]
    assert not failures, f"{len(failures)} of {len(load.answers)} requests failed during the update: {failures[:3]}"
    digests = load.digests()
    assert digests[0] == old and digests[-1] == new, (digests[:3], digests[-3:])
    assert set(digests) == {old, new} and digests.count(old) >= 3
    for _, _, digest, scores in load.answers:  # the digest names the weights that gave these very scores
        np.testing.assert_allclose(scores, expected[digest], rtol=1e-4, atol=1e-5)
