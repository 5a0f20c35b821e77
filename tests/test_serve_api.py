"""The API as peers expect it, over HTTP on the session's tiny endpoint: the OpenAI model list, /version and the
weights digest in every score response, bearer auth and examples in the OpenAPI, the Grafana dashboard's series,
and the RL-trainer reward functions `(images, prompts, metadata) -> (scores, info)`."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import urllib.request

import numpy as np
import pytest
import requests
from conftest import REPO_ROOT
from PIL import Image
from test_serve import b64, png_bytes, score_json

from rayapp.serve import wire

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["a red circle", "two blue squares", "three green triangles", "a small yellow square"]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_models_answer_in_openai_list_shape_and_keep_their_fields(serve_app):
    body = requests.get(f"{serve_app.url}/v1/models", timeout=30).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [m["id"] for m in body["models"]] == ["tiny-test", "tiny-blip"]
    now = time.time()
    for entry in body["data"]:
        assert entry["object"] == "model" and entry["owned_by"] == "rayapp"
        assert isinstance(entry["created"], int) and 0 < entry["created"] <= now
    digests = {"tiny-test": sha256(serve_app.model_dir / "model.safetensors"),
               "tiny-blip": sha256(serve_app.blip_dir / "model.safetensors")}
    assert {m["id"]: m["weights_sha256"] for m in body["data"]} == digests
    assert {m["id"]: m["weights_sha256"] for m in body["models"]} == digests
    assert {m["weights_file"] for m in body["models"]} == {"model.safetensors"}
    # The fields rayapp clients read stay where they were.
    assert body["default"] == "tiny-test" and body["models"][0]["default"] is True
    assert body["models"][0]["image_size"] == 64 and body["limits"]["max_images"] == 8
    assert body["batching"]["max_batch_size"] >= 1 and body["auth_required"] is False


def test_version_and_every_score_response_name_the_weights(serve_app):
    import rayapp

    url = serve_app.url
    tiny = sha256(serve_app.model_dir / "model.safetensors")
    blip = sha256(serve_app.blip_dir / "model.safetensors")
    version = requests.get(f"{url}/version", timeout=30).json()
    assert version["version"] == rayapp.__version__ and version["request_id"]
    assert {m["id"]: (m["weights_sha256"], m["weights_file"]) for m in version["models"]} == {
        "tiny-test": (tiny, "model.safetensors"), "tiny-blip": (blip, "model.safetensors")}

    resp = score_json(url, "a red circle", [png_bytes(1), png_bytes(2)])
    assert resp.status_code == 200 and resp.json()["weights_sha256"] == tiny
    pairs = requests.post(f"{url}/v1/score_pairs", json={"prompts": PROMPTS[:2], "images": [b64(png_bytes(3))] * 2,
                                                         "model": "tiny-blip"}, timeout=60)
    assert pairs.status_code == 200 and pairs.json()["weights_sha256"] == blip
    batch = requests.post(f"{url}/v1/score_batch", data=wire.encode_pairs(PROMPTS, [png_bytes(i) for i in range(4)]),
                          headers={"Content-Type": wire.CONTENT_TYPE}, timeout=60)
    assert batch.status_code == 200 and batch.json()["weights_sha256"] == tiny
    annotated = requests.post(f"{url}/v1/annotate", json={"prompt": "a cat", "image": b64(png_bytes(4))}, timeout=60)
    assert annotated.status_code == 200 and annotated.headers["X-Weights-SHA256"] == tiny


def test_openapi_declares_bearer_auth_and_examples_that_score(serve_app):
    spec = requests.get(f"{serve_app.url}/openapi.json", timeout=30).json()
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            wanted = [{"bearerAuth": []}] if path.startswith("/v1") else None
            assert operation.get("security") == wanted, path
    assert {"/version", "/v1/models", "/v1/score_batch"} <= set(spec["paths"])
    unavailable = spec["paths"]["/v1/score"]["post"]["responses"]["503"]
    assert "Retry-After" in unavailable["headers"]
    for path in ("/v1/score", "/v1/score_pairs", "/v1/score_batch"):
        example = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        resp = requests.post(f"{serve_app.url}{path}", json=example, timeout=60)  # the examples are real requests
        assert resp.status_code == 200, (path, resp.text)
        assert len(resp.json()["scores"]) == len(example["images"])


def _prometheus_text() -> str:
    import ray

    head = next(node for node in ray.nodes() if node["Alive"] and node.get("MetricsExportPort"))
    with urllib.request.urlopen(f"http://{head['NodeManagerAddress']}:{head['MetricsExportPort']}/metrics",
                                timeout=30) as resp:
        return resp.read().decode()


def test_grafana_variable_comes_from_an_always_present_series(serve_app):
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "rayapp_serve_dashboard.json").read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "application"]
    metric, selector = re.fullmatch(r"label_values\((\w+)\{(.*)\}, application\)", variable["query"]["query"]).groups()
    assert metric == "ray_serve_deployment_replica_healthy"
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    assert "healthy replicas" in titles and "queue" in titles and "error ratio" in titles
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    assert all('application=~"$application"' in expr for expr in exprs.values()), exprs
    # The series behind the variable and the health / queue panels exist on a running app, scored or not.
    wanted_labels = dict(re.findall(r'(\w+)="([^"]*)"', selector), application=serve_app.app_name)
    deadline, found = time.time() + 90, False
    while not found and time.time() < deadline:
        text = _prometheus_text()
        found = any(all(f'{k}="{v}"' in line for k, v in wanted_labels.items())
                    for line in text.splitlines() if line.startswith(metric + "{"))
        if not found:
            time.sleep(3)
    assert found, f"no {metric} series with {wanted_labels} in Ray's Prometheus export"
    for name in ("ray_serve_deployment_queued_queries", "ray_serve_num_http_requests_total"):
        assert re.search(rf'^{name}\{{[^}}]*application="{serve_app.app_name}"', text, re.MULTILINE), name


def _images(kind: str, n: int, rng: np.random.Generator):
    """A batch as a trainer holds it, and the same pixels as the list the library scores."""
    import torch

    pixels = rng.integers(0, 256, size=(n, 48, 56, 3), dtype=np.uint8)
    if kind == "tensor":  # a diffusion pipeline's output: NCHW float in [0, 1]
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        return batch, [image.permute(1, 2, 0).numpy() for image in batch]
    if kind == "numpy":  # NHWC uint8, as flow_grpo converts before scoring
        return pixels, list(pixels)
    images = [Image.fromarray(image) for image in pixels]
    return images, images


def test_ddpo_reward_fn_and_async_compute_score_give_library_scores_and_the_digest(serve_app):
    import rayapp
    from rayapp.serve.client import AsyncRewardClient, compute_score, make_ddpo_reward_fn

    model = rayapp.load(serve_app.model_dir, device="cpu")
    digest = sha256(serve_app.model_dir / "model.safetensors")
    rng = np.random.default_rng(5)
    metadata = [{"seed": i} for i in range(4)]
    batches = {kind: _images(kind, 4, rng) for kind in ("tensor", "numpy", "pil")}
    with make_ddpo_reward_fn(serve_app.url, model="tiny-test") as reward_fn:
        for kind, (batch, as_list) in batches.items():
            scores, info = reward_fn(batch, PROMPTS, metadata)
            assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (4,), kind
            np.testing.assert_allclose(scores, model.score_pairs(PROMPTS, as_list), rtol=1e-4, atol=1e-5)
            assert info == {"model": "tiny-test", "weights_sha256": digest, "weights_sha256_all": [digest]}, kind

    batch, as_list = batches["tensor"]

    async def run():
        async with AsyncRewardClient(serve_app.url, max_pairs_per_request=3) as client:  # 3 + 1 pairs
            return await client.compute_score(batch, PROMPTS, metadata), await compute_score(
                serve_app.url, batch, PROMPTS, metadata, model="tiny-blip")

    (scores, info), (blip_scores, blip_info) = asyncio.run(run())
    np.testing.assert_allclose(scores, model.score_pairs(PROMPTS, as_list), rtol=1e-4, atol=1e-5)
    assert scores.dtype == np.float32 and info["weights_sha256"] == digest and info["model"] == "tiny-test"
    assert blip_info["model"] == "tiny-blip" and blip_info["weights_sha256"] == sha256(
        serve_app.blip_dir / "model.safetensors")
    assert blip_scores.shape == (4,) and not np.allclose(blip_scores, scores, atol=1e-3)
    with pytest.raises(ValueError, match="pair one to one"):
        asyncio.run(compute_score(serve_app.url, batch, PROMPTS[:3]))



def _shipped_configs() -> list:
    """serve_configs/*.yaml, wherever the checkout or the package keeps them."""
    return sorted({*REPO_ROOT.glob("serve_configs/*.yaml"), *REPO_ROOT.glob("rayapp/**/serve_configs/*.yaml")})


def test_every_shipped_config_bounds_the_model_queue_and_says_when_to_retry():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    configs = _shipped_configs()
    assert len({path.name for path in configs}) >= 3, configs
    for path in configs:
        config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        for app in config.applications:
            deployments = {d.name: d for d in app.deployments}
            for name in ("RewardScorer", "RewardAPI"):
                queue = deployments[name].max_queued_requests
                assert isinstance(queue, int) and queue >= 1, (path.name, name, queue)
                assert deployments[name].backpressure_config.retry_after_s >= 1, (path.name, name)
