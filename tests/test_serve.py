"""The reward endpoint on a real Serve instance, over HTTP on loopback."""
from __future__ import annotations

import base64
import io
import os
import signal
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
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
