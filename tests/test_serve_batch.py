"""The batch API for RL trainers (/v1/score_batch), its binary body, and the async client / reward_fn."""
from __future__ import annotations

import asyncio
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
from PIL import Image
from test_serve import b64, png_bomb, png_bytes

from rayapp.serve import wire

pytestmark = pytest.mark.timeout(300)

WORDS = ["a red circle", "two blue squares", "three green triangles on a white background", "a small yellow square"]


def small_png(seed: int) -> bytes:
    """32x32 random RGB: 256 of them stay under the test app's 2 MiB body limit."""
    return png_bytes(seed, (32, 32))


def post_wire(url: str, prompts: list[str], images: list[bytes], model: str | None = None, **kw):
    params = {"model": model} if model else None
    return requests.post(f"{url}/v1/score_batch", data=wire.encode_pairs(prompts, images), params=params,
                         headers={"Content-Type": wire.CONTENT_TYPE}, timeout=120, **kw)


# ---- the binary format, without a server --------------------------------------------------------------

def test_wire_round_trip_and_refusals():
    prompts, images = ["a cat", "ünïcødé 猫"], [b"\x89PNG one", b"two"]
    body = wire.encode_pairs(prompts, images)
    decoded = wire.decode_pairs(body, max_pairs=4, max_prompt_bytes=100, max_image_bytes=100)
    assert [p for p, _ in decoded] == prompts and [bytes(i) for _, i in decoded] == images

    def refused(data: bytes, **limits) -> wire.WireFormatError:
        kw = {"max_pairs": 4, "max_prompt_bytes": 100, "max_image_bytes": 100, **limits}
        with pytest.raises(wire.WireFormatError) as err:
            wire.decode_pairs(data, **kw)
        return err.value

    assert refused(b"JUNK" + body[4:]).field == "body"
    assert refused(body[:-1]).field == "pairs[1].image"
    assert refused(body + b"x").message.startswith("1 bytes after")
    assert refused(body, max_pairs=1).status == 413
    assert refused(body, max_image_bytes=5).field == "pairs[0].image"
    assert refused(wire.MAGIC + (0).to_bytes(4, "big")).reason == "count"
    bad_utf8 = wire.MAGIC + (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\xff" + (1).to_bytes(4, "big") + b"x"
    assert refused(bad_utf8).reason == "prompt"
    # A count far above the limit is refused before anything is read.
    assert refused(wire.MAGIC + (10**9).to_bytes(4, "big")).status == 413


# ---- over HTTP --------------------------------------------------------------------------------------

def test_256_pairs_equal_library_score_pairs_in_order(serve_app):
    import rayapp

    images = [small_png(1000 + i) for i in range(256)]
    prompts = [WORDS[i % len(WORDS)] for i in range(256)]
    expected = rayapp.load(serve_app.model_dir, device="cpu").score_pairs(prompts, images, batch_size=64)

    resp = post_wire(serve_app.url, prompts, images)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "tiny-test" and len(body["scores"]) == 256
    np.testing.assert_allclose(body["scores"], expected, rtol=1e-4, atol=1e-5)
    assert body["batch_size"] <= 16  # the model's max_batch_size: the request was split, never one huge batch

    # multipart (repeated prompts + images parts) and JSON give the same numbers
    files = [("images", (f"{i}.png", img, "image/png")) for i, img in enumerate(images[:40])]
    multi = requests.post(f"{serve_app.url}/v1/score_batch", data={"prompts": prompts[:40]}, files=files, timeout=120)
    assert multi.status_code == 200, multi.text
    np.testing.assert_allclose(multi.json()["scores"], expected[:40], rtol=1e-4, atol=1e-5)
    js = requests.post(f"{serve_app.url}/v1/score_batch", timeout=120,
                       json={"prompts": prompts[:12], "images": [b64(i) for i in images[:12]]})
    np.testing.assert_allclose(js.json()["scores"], expected[:12], rtol=1e-4, atol=1e-5)


def test_batch_bad_input_corpus(serve_app):
    good = small_png(1)
    url = serve_app.url
    raw = lambda data: requests.post(f"{url}/v1/score_batch", data=data, timeout=60,  # noqa: E731
                                     headers={"Content-Type": wire.CONTENT_TYPE})
    cases = {
        "257_pairs": (lambda: post_wire(url, ["a"] * 257, [good] * 257), 413, "limit is 256"),
        "bad_magic": (lambda: raw(b"XXXX" + b"\x00" * 8), 422, "body"),
        "truncated_body": (lambda: raw(wire.encode_pairs(["a", "b"], [good, good])[:-10]), 422, "pairs[1].image"),
        "not_an_image": (lambda: post_wire(url, ["a", "b", "c"], [good, good, b"not an image"]), 422,
                         "pairs[2].image"),
        "png_bomb": (lambda: post_wire(url, ["a", "b"], [good, png_bomb(20_000, 20_000)]), 422, "pixels"),
        "empty_prompt": (lambda: post_wire(url, ["a", "  "], [good, good]), 422, "pairs[1].prompt"),
        "prompt_too_long": (lambda: post_wire(url, ["a" * 1001], [good]), 422, "1001 characters"),
        "zero_pairs": (lambda: raw(wire.MAGIC + b"\x00\x00\x00\x00"), 422, "at least one"),
        "mismatch_json": (lambda: requests.post(f"{url}/v1/score_batch", timeout=60,
                                                json={"prompts": ["a", "b"], "images": [b64(good)]}), 422, "prompts"),
        "oversized_body": (lambda: raw(b"RWP1" + b"\x00" * (3 << 20)), 413, "body"),
        "wrong_type": (lambda: requests.post(f"{url}/v1/score_batch", data=b"x", timeout=60,
                                             headers={"Content-Type": "application/octet-stream"}), 415,
                       wire.CONTENT_TYPE),
        "unknown_model": (lambda: post_wire(url, ["a"], [good], model="no-such-model"), 404, "model"),
    }
    for name, (send, status, needle) in cases.items():
        resp = send()
        assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text[:300]}"
        body = resp.json()
        assert needle.lower() in body["detail"].lower(), f"{name}: {body!r} does not name {needle!r}"
        assert body["request_id"], name
        ok = post_wire(url, ["a red circle"], [good])
        assert ok.status_code == 200, f"after {name}: {ok.text}"


def test_sync_client_batch_and_reward_fn_accept_arrays_and_tensors(serve_app):
    import torch

    import rayapp
    from rayapp.serve.client import RewardClient

    rng = np.random.default_rng(0)
    batch = rng.random((5, 3, 40, 48), dtype=np.float32)  # CHW floats in [0, 1], as a diffusion sampler gives
    prompts = [WORDS[i % 4] for i in range(5)]
    expected = rayapp.load(serve_app.model_dir, device="cpu").score_pairs(prompts, list(batch))
    client = RewardClient(serve_app.url, timeout=60)
    np.testing.assert_allclose(client.reward_fn(batch, prompts), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(client.reward_fn(torch.from_numpy(batch), prompts), expected, rtol=1e-4, atol=1e-5)
    blip = client.score_batch(prompts, batch, model="tiny-blip")
    assert not np.allclose(blip, expected, atol=1e-3)


def test_async_client_pools_and_splits_large_batches(serve_app):
    import rayapp
    from rayapp.serve.client import AsyncRewardClient, make_reward_fn

    images = [Image.open(io.BytesIO(small_png(2000 + i))) for i in range(40)]
    prompts = [WORDS[i % 4] for i in range(40)]
    expected = rayapp.load(serve_app.model_dir, device="cpu").score_pairs(prompts, images)

    async def run() -> tuple[list[float], list[list[float]], int]:
        async with AsyncRewardClient(serve_app.url, max_pairs_per_request=16, max_connections=4) as client:
            whole = await client.reward_fn(images, prompts)  # 16 + 16 + 8 pairs, sent concurrently
            several = await asyncio.gather(*[client.score_batch(prompts[i:i + 5], images[i:i + 5])
                                             for i in range(0, 40, 5)])
            return whole, several, (await client.models())["limits"]["max_batch_pairs"]

    whole, several, limit = asyncio.run(run())
    np.testing.assert_allclose(whole, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([s for part in several for s in part], expected, rtol=1e-4, atol=1e-5)
    assert limit == 256
    with make_reward_fn(serve_app.url, model="tiny-test") as reward_fn:
        np.testing.assert_allclose(reward_fn(images[:7], prompts[:7]), expected[:7], rtol=1e-4, atol=1e-5)


class _FlakyHandler(BaseHTTPRequestHandler):
    """Answers 503 `fail_first` times, then a fixed batch response; counts the requests."""

    calls = 0
    fail_first = 2

    def do_POST(self):  # noqa: N802 -- http.server's naming
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).calls <= type(self).fail_first:
            status, body = 503, {"detail": "no model replica available; retry shortly", "field": None}
        else:
            status, body = 200, {"scores": [0.5]}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_async_client_retries_503_a_bounded_number_of_times():
    from rayapp.serve.client import AsyncRewardClient, RewardServiceError

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    async def score(retries: int) -> list[float]:
        async with AsyncRewardClient(url, max_retries=retries, retry_backoff_s=0.01, max_pairs_per_request=8) as c:
            return await c.score_batch(["a"], [small_png(1)])

    try:
        _FlakyHandler.calls, _FlakyHandler.fail_first = 0, 2
        assert asyncio.run(score(retries=3)) == [0.5] and _FlakyHandler.calls == 3
        _FlakyHandler.calls, _FlakyHandler.fail_first = 0, 10
        with pytest.raises(RewardServiceError) as err:
            asyncio.run(score(retries=2))
        assert err.value.status == 503 and _FlakyHandler.calls == 3  # 1 try + 2 retries, then it gives up
    finally:
        server.shutdown()
