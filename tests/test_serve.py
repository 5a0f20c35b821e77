"""The reward endpoint on a real Serve instance, over HTTP on loopback."""
from __future__ import annotations

import base64
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import REPO_ROOT, free_port
from PIL import Image

pytestmark = pytest.mark.timeout(300)


def png_bytes(seed: int, size: tuple[int, int] = (80, 64)) -> bytes:
    """A small random RGB PNG; different seeds give different scores."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def score_json(url: str, prompt: str, images: list[bytes], timeout: float = 60) -> requests.Response:
    return requests.post(f"{url}/v1/score", json={"prompt": prompt, "images": [b64(i) for i in images]},
                         timeout=timeout)


def good_request_succeeds(url: str) -> None:
    resp = score_json(url, "a red circle", [png_bytes(1)])
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["scores"]) == 1


# ---- the shipped configs and `serve run` (first: it needs Serve to itself) ----------------------

CONFIGS = REPO_ROOT / "serve_configs"


@pytest.mark.parametrize("name", ["rm.yaml", "rm_cpu_local.yaml", "rm_multi.yaml"])
def test_config_is_valid(name):
    from ray.serve.schema import ServeDeploySchema

    from rayapp.serve.app import AppArgs

    config = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / name).read_text()))
    (app,) = config.applications
    assert app.import_path == "rayapp.serve.app:build_app"
    args = AppArgs.model_validate(app.args)  # unknown keys (typos) are errors
    assert {d.name for d in app.deployments} == {"RewardScorer", "RewardAPI"}
    scorer = next(d for d in app.deployments if d.name == "RewardScorer")
    assert ({"max_batch_size", "batch_wait_timeout_s"} <= set(scorer.user_config)
            <= {"max_batch_size", "batch_wait_timeout_s", "models"})
    assert set(scorer.user_config.get("models", {})) <= {spec.id for spec in args.model_specs()}
    if name == "rm_cpu_local.yaml":
        assert args.device == "cpu" and args.auth is None and config.http_options.host == "127.0.0.1"
        return
    # Production configs listen on every interface, so they need a token; they run on GPUs in bf16.
    assert config.http_options.host == "0.0.0.0" and args.auth is not None
    assert args.model_specs()[0].id == "ImageReward-v1.0" and args.device == "cuda" and args.dtype == "bfloat16"
    auto = scorer.autoscaling_config
    assert auto["min_replicas"] < auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    assert scorer.ray_actor_options.num_gpus == 1
    if name == "rm_multi.yaml":
        assert [s.scorer for s in args.model_specs()] == ["ImageReward", "CLIP", "BLIP", "Aesthetic"]
        assert args.multiplex is not None


def test_old_one_model_args_still_validate():
    from rayapp.serve.app import AppArgs

    args = AppArgs.model_validate({"model": "/abs/runs/rm/model", "device": "cpu", "limits": {"max_images": 4}})
    (spec,) = args.model_specs()
    assert spec.id == "/abs/runs/rm/model" and spec.source == "/abs/runs/rm/model" and spec.scorer == "ImageReward"
    with pytest.raises(ValueError, match="either `model`"):
        AppArgs.model_validate({"model": "a", "models": [{"id": "b"}]})
    with pytest.raises(ValueError, match="unique"):
        AppArgs.model_validate({"models": [{"id": "b"}, {"id": "b", "scorer": "CLIP"}]})
    with pytest.raises(ValueError, match="unknown scorer 'DALL-E'; available scores"):
        AppArgs.model_validate({"models": [{"id": "b", "scorer": "DALL-E"}]})


def test_serve_run_offline_config(ray_cluster, serve_manager, tiny_rm_dir, tmp_path):
    import rayapp

    serve_manager.stop()  # one Serve per cluster: `serve run` brings its own, from the config

    port = free_port()
    config = yaml.safe_load((CONFIGS / "rm_cpu_local.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    config["applications"][0]["args"]["model"] = str(tiny_rm_dir)
    # A second application asking for a GPU this CPU cluster lacks: it must fail at once, saying so.
    gpu_app = yaml.safe_load(yaml.safe_dump(config["applications"][0]))
    gpu_app.update(name="gpu", route_prefix="/gpu")
    gpu_app["args"]["name"] = "gpu-model"  # a builder cannot tell two applications with equal args apart
    gpu_app["deployments"][0]["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}
    config["applications"].append(gpu_app)
    path = tmp_path / "rm_cpu_local.yaml"
    path.write_text(yaml.safe_dump(config))

    bin_dir = Path(sys.executable).parent
    log_path = tmp_path / "serve_run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(bin_dir / "serve"), "run", str(path)], env=ray_cluster.env, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, f"serve run exited {proc.returncode}: {log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"serve run never became healthy: {log_path.read_text()[-3000:]}")

        images = [b64(png_bytes(i, (72, 48))) for i in range(3)]
        resp = requests.post(f"{url}/v1/score", json={"prompt": "a red circle", "images": images}, timeout=60)
        assert resp.status_code == 200, resp.text
        expected = rayapp.load(tiny_rm_dir, device="cpu").score("a red circle", [base64.b64decode(i) for i in images])
        np.testing.assert_allclose(resp.json()["scores"], expected, rtol=1e-4, atol=1e-5)
        assert resp.json()["model"] == "rayapp-rm-local"

        from ray import serve

        assert wait_for(lambda: serve.status().applications["gpu"].status == "DEPLOY_FAILED", timeout=60)
        message = serve.status().applications["gpu"].message
        assert "RewardScorer" in message and "GPU 1" in message and "no node" in message, message
    finally:
        # ENVIRONMENT.md: a background `serve run` ignores SIGINT; shut Serve down, then SIGTERM its PID.
        subprocess.run([str(bin_dir / "serve"), "shutdown", "-y", "-a", ray_cluster.dashboard_url],
                       env=ray_cluster.env, timeout=120, capture_output=True, check=False)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            pytest.fail("serve run did not stop on SIGTERM")
    with pytest.raises(requests.RequestException):
        requests.get(f"{url}/healthz", timeout=5)


# ---- correctness -------------------------------------------------------------------------------

def test_http_scores_equal_library_scores(serve_app):
    import rayapp

    images = [png_bytes(i) for i in range(5)]
    prompt = "two red circles on a blue background"
    model = rayapp.load(serve_app.model_dir, device="cpu", dtype="float32")
    expected = model.score(prompt, images)

    resp = score_json(serve_app.url, prompt, images)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "tiny-test"
    np.testing.assert_allclose(body["scores"], expected, rtol=1e-4, atol=1e-5)
    assert body["ranking"] == [sorted(expected, reverse=True).index(s) + 1 for s in expected]
    assert body["truncated_prompt"] is False

    # multipart upload: same numbers
    files = [("images", (f"{i}.png", img, "image/png")) for i, img in enumerate(images)]
    resp = requests.post(f"{serve_app.url}/v1/score", data={"prompt": prompt}, files=files, timeout=60)
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(resp.json()["scores"], expected, rtol=1e-4, atol=1e-5)

    # one-to-one pairs
    prompts = ["a red circle", "a blue square", "three green triangles"]
    resp = requests.post(f"{serve_app.url}/v1/score_pairs",
                         json={"prompts": prompts, "images": [b64(i) for i in images[:3]]}, timeout=60)
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(resp.json()["scores"], model.score_pairs(prompts, images[:3]), rtol=1e-4, atol=1e-5)


def test_long_prompt_is_flagged_truncated(serve_app):
    prompt = " ".join(["red circle"] * 40)  # far above the 35-token limit, within the character limit
    resp = score_json(serve_app.url, prompt, [png_bytes(3)])
    assert resp.status_code == 200, resp.text
    assert resp.json()["truncated_prompt"] is True


def test_annotate_writes_score_into_png_text(serve_app):
    import rayapp

    image = png_bytes(7)
    prompt = "a yellow square"
    resp = requests.post(f"{serve_app.url}/v1/annotate", json={"prompt": prompt, "image": b64(image)}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(resp.content))
    expected = rayapp.load(serve_app.model_dir, device="cpu").score(prompt, image)
    assert f"ImageReward Score: {expected:.4f}" in out.text["parameters"]
    assert float(out.text["ImageReward Score"]) == pytest.approx(expected, abs=1e-4)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))



def test_annotate_keeps_generation_info_and_odd_modes():
    from PIL.PngImagePlugin import PngInfo

    from rayapp.serve.annotate import annotate_png

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a")
    info.add_text("Software", "sd-webui")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG", pnginfo=info)
    out = Image.open(io.BytesIO(annotate_png(Image.open(io.BytesIO(buf.getvalue())), -0.123456)))
    assert out.text["parameters"] == "a cat\nSteps: 20, Sampler: Euler a\nImageReward Score: -0.1235"
    assert out.text["Software"] == "sd-webui" and out.text["ImageReward Score"] == "-0.1235"
    cmyk = Image.open(io.BytesIO(annotate_png(Image.new("CMYK", (4, 4)), 1.0)))  # e.g. from a CMYK JPEG
    assert cmyk.format == "PNG" and cmyk.mode == "RGB" and cmyk.text["parameters"] == "ImageReward Score: 1.0000"

def test_health_models_docs_and_page(serve_app):
    health = requests.get(f"{serve_app.url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = requests.get(f"{serve_app.url}/v1/models", timeout=30).json()
    assert models["models"][0]["id"] == "tiny-test"
    assert models["models"][0]["image_size"] == 64
    assert models["limits"]["max_images"] == 8
    assert requests.get(f"{serve_app.url}/docs", timeout=30).status_code == 200
    spec = requests.get(f"{serve_app.url}/openapi.json", timeout=30).json()
    assert {"/v1/score", "/v1/score_pairs", "/v1/annotate", "/healthz", "/v1/models"} <= set(spec["paths"])
    page = requests.get(f"{serve_app.url}/", timeout=30)
    assert page.status_code == 200 and 'id="lower-limit"' in page.text


def test_python_client(serve_app, tmp_path):
    from rayapp.serve.client import RewardClient, RewardServiceError

    client = RewardClient(serve_app.url, timeout=60)
    assert client.health()
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(11))
    pil = Image.open(io.BytesIO(png_bytes(12)))
    scores = client.score("a red circle", [path, png_bytes(13), pil])
    direct = score_json(serve_app.url, "a red circle", [png_bytes(11), png_bytes(13), png_bytes(12)]).json()["scores"]
    np.testing.assert_allclose(scores, direct, rtol=1e-5)
    assert len(client.score_pairs(["a cat", "a dog"], [png_bytes(1), png_bytes(2)])) == 2
    with pytest.raises(RewardServiceError) as err:
        client.score("", [png_bytes(1)])
    assert err.value.status == 422 and "prompt" in err.value.detail
    assert not RewardClient("http://127.0.0.1:9", timeout=2).health()  # nothing listens on the discard port



def test_cli_score_endpoint(serve_app, tmp_path, capsys):
    import json

    from rayapp.cli import main

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(400 + i))
    assert main(["score", "--endpoint", serve_app.url, "--prompt", "a red circle", "--json", *map(str, paths)]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    direct = score_json(serve_app.url, "a red circle", [p.read_bytes() for p in paths]).json()["scores"]
    by_image = {r["image"]: r["score"] for r in results}
    np.testing.assert_allclose([by_image[str(p)] for p in paths], direct, rtol=1e-5)
    assert [r["rank"] for r in results] == [1, 2, 3] and results[0]["score"] == max(direct)

# ---- bad inputs ----------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros: tens of kB on the wire, `width*height` pixels decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    rows_per_feed = 1000
    idat = b"".join(comp.compress(row * min(rows_per_feed, height - y)) for y in range(0, height, rows_per_feed))
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """An IHDR claiming an RGB image of width x height followed by almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def _bad_cases(url: str) -> dict:
    """name -> (callable sending the request, expected status, text the message must name)."""
    good = b64(png_bytes(2))

    def post(body, **kw):
        return requests.post(f"{url}/v1/score", json=body, timeout=60, **kw)

    big_noise = np.random.default_rng(0).integers(0, 256, 1_200_000, dtype=np.uint8).tobytes()
    return {
        "non_image_bytes": (lambda: post({"prompt": "a cat", "images": [good, b64(b"this is not an image at all")]}),
                            422, "images[1]"),
        "truncated_png": (lambda: post({"prompt": "a cat", "images": [good, good, b64(png_bytes(5)[:300])]}),
                          422, "images[2]"),
        "empty_prompt": (lambda: post({"prompt": "   ", "images": [good]}), 422, "prompt"),
        "missing_prompt": (lambda: post({"images": [good]}), 422, "prompt"),
        "invalid_json": (lambda: requests.post(f"{url}/v1/score", data=b"{prompt: oops",
                                               headers={"Content-Type": "application/json"}, timeout=60),
                         400, "JSON"),
        "wrong_json_types": (lambda: post({"prompt": "a cat", "images": "abc"}), 422, "images"),
        "unknown_json_field": (lambda: post({"prompt": "a cat", "images": [good], "url": "x"}), 422, "url"),
        "not_base64": (lambda: post({"prompt": "a cat", "images": ["@@not base64@@"]}), 422, "images[0]"),
        "url_instead_of_image": (lambda: post({"prompt": "a cat", "images": ["https://example.com/a.png"]}),
                                 422, "not fetched"),
        "no_images": (lambda: post({"prompt": "a cat", "images": []}), 422, "images"),
        "too_many_images": (lambda: post({"prompt": "a cat", "images": [good] * 9}), 413, "limit is 8"),
        "oversized_image": (lambda: post({"prompt": "a cat", "images": [b64(big_noise)]}), 413, "images[0]"),
        "oversized_payload": (lambda: post({"prompt": "a cat", "images": ["A" * 3_000_000]}), 413, "body"),
        "png_bomb_20k": (lambda: post({"prompt": "a cat", "images": [b64(png_bomb(20_000, 20_000))]}),
                         422, "pixels"),
        "png_header_20k": (lambda: post({"prompt": "a cat", "images": [good, b64(png_header_only(20_000, 20_000))]}),
                           422, "images[1]"),
        "png_over_pixel_limit": (lambda: post({"prompt": "a cat", "images": [b64(png_bomb(3000, 3000))]}),
                                 422, "limit of 4000000"),
        "prompt_10k_chars": (lambda: post({"prompt": "a" * 10_000, "images": [good]}), 422, "10000 characters"),
        "wrong_content_type": (lambda: requests.post(f"{url}/v1/score", data="prompt=a", timeout=60,
                                                     headers={"Content-Type": "text/plain"}), 415, "content-type"),
        "multipart_text_as_image": (lambda: requests.post(f"{url}/v1/score", files={"prompt": (None, "a cat"),
                                                                                     "images": (None, "text")},
                                                          timeout=60), 422, "images[0]"),
        "pairs_length_mismatch": (lambda: requests.post(f"{url}/v1/score_pairs", timeout=60,
                                                        json={"prompts": ["a", "b"], "images": [good]}),
                                  422, "prompts"),
        "annotate_not_an_image": (lambda: requests.post(f"{url}/v1/annotate", timeout=60,
                                                        json={"prompt": "a", "image": b64(b"GIF89a junk")}),
                                  422, "image"),
    }


def test_bad_input_corpus_is_refused_and_server_stays_healthy(serve_app):
    for name, (send, status, needle) in _bad_cases(serve_app.url).items():
        resp = send()
        assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text[:300]}"
        detail = resp.json()["detail"]
        assert needle.lower() in str(detail).lower(), f"{name}: {detail!r} does not name {needle!r}"
        good_request_succeeds(serve_app.url)


def test_bad_images_do_not_poison_concurrent_batches(serve_app):
    bad = b64(png_bytes(5)[:300])
    good = [png_bytes(20 + i) for i in range(12)]

    def one(i: int) -> requests.Response:
        if i % 3 == 0:
            return requests.post(f"{serve_app.url}/v1/score", json={"prompt": "a cat", "images": [bad]}, timeout=60)
        return score_json(serve_app.url, "a cat", [good[i]])

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    assert [r.status_code for r in results] == [422 if i % 3 == 0 else 200 for i in range(12)]


# ---- batching, autoscaling, fault tolerance --------------------------------------------------------

def test_concurrent_requests_are_batched(serve_app):
    images = [png_bytes(100 + i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda img: score_json(serve_app.url, "a blue square", [img]), images))
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    merged = [r.json()["batch_requests"] for r in results]
    assert max(merged) > 1, f"no request shared a forward pass: {merged}"
    assert max(r.json()["batch_size"] for r in results) > 1


def _scorer_replicas(state: str = "RUNNING") -> int:
    from ray import serve

    deployment = serve.status().applications["rm"].deployments["RewardScorer"]
    return deployment.replica_states.get(state, 0)


def _scorer_pids(cluster) -> set[int]:
    from ray.util.state import list_actors

    # An explicit address: other Ray clusters may run on this machine.
    actors = list_actors(address=cluster.dashboard_url,
                         filters=[("class_name", "=", "ServeReplica:rm:RewardScorer"), ("state", "=", "ALIVE")])
    return {a.pid for a in actors}


class LoopbackLoad:
    """`clients` threads posting one-image requests to 127.0.0.1 until stopped or `max_requests` are sent."""

    def __init__(self, url: str, clients: int, max_requests: int):
        self.url, self.clients, self.max_requests = url, clients, max_requests
        self.sent = 0
        self.statuses: list[int] = []
        self.stop = False
        self.pool = ThreadPoolExecutor(clients)
        self.image = png_bytes(42)

    def _client(self) -> None:
        session = requests.Session()
        while not self.stop and self.sent < self.max_requests:
            self.sent += 1
            try:
                status = session.post(f"{self.url}/v1/score", timeout=60,
                                      json={"prompt": "a red circle", "images": [b64(self.image)]}).status_code
            except requests.RequestException:
                status = -1
            self.statuses.append(status)

    def __enter__(self):
        self.futures = [self.pool.submit(self._client) for _ in range(self.clients)]
        return self

    def __exit__(self, *exc) -> None:
        self.stop = True
        self.pool.shutdown(wait=True)


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_load_scales_one_to_two_replicas_and_back(serve_app):
    assert wait_for(lambda: _scorer_replicas() == 1, timeout=60), "did not start from one replica"
    with LoopbackLoad(serve_app.url, clients=8, max_requests=3000) as load:
        scaled_up = wait_for(lambda: _scorer_replicas() == 2, timeout=60)
        if scaled_up:  # the second replica must serve as well, not just exist
            time.sleep(1.0)
    assert scaled_up, f"never reached 2 replicas after {load.sent} requests"
    assert load.statuses.count(200) == len(load.statuses), f"failures under load: {set(load.statuses)}"
    assert wait_for(lambda: _scorer_replicas() == 1 and _scorer_replicas("STOPPING") == 0, timeout=60), \
        "did not scale back down to one replica"
    good_request_succeeds(serve_app.url)


def test_killed_replica_is_replaced(serve_app, ray_cluster):
    assert wait_for(lambda: len(_scorer_pids(ray_cluster)) >= 1, timeout=30)
    before = _scorer_pids(ray_cluster)
    victim = min(before)
    with LoopbackLoad(serve_app.url, clients=4, max_requests=2000) as load:
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(lambda: victim not in _scorer_pids(ray_cluster)
                            and len(_scorer_pids(ray_cluster) - before) >= 1 and _scorer_replicas() >= 1, timeout=90)
    assert replaced, f"replica {victim} was not replaced; alive: {_scorer_pids(ray_cluster)}"
    assert load.statuses.count(200) > 0
    for i in range(5):
        resp = score_json(serve_app.url, "a green triangle", [png_bytes(200 + i)])
        assert resp.status_code == 200, resp.text
    health = requests.get(f"{serve_app.url}/healthz", timeout=30)
    assert health.status_code == 200
