"""Application metrics reach Ray's Prometheus export (the head's --metrics-export-port) after real traffic."""
from __future__ import annotations

import re
import time
import urllib.request

import pytest
import requests
from test_serve import b64, png_bomb, png_bytes, score_json

from rayapp.serve import wire

pytestmark = pytest.mark.timeout(300)


def metrics_url() -> str:
    import ray

    head = next(node for node in ray.nodes() if node["Alive"] and node.get("MetricsExportPort"))
    return f"http://{head['NodeManagerAddress']}:{head['MetricsExportPort']}/metrics"


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of every sample of metric `name` in Prometheus text format."""
    out = []
    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.eE+-]+|NaN)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        out.append((labels, float(match.group(2))))
    return out


def total(text: str, name: str, **labels: str) -> float:
    return sum(value for have, value in samples(text, name) if all(have.get(k) == v for k, v in labels.items()))


def test_metrics_reach_prometheus(serve_app):
    url = serve_app.url
    for i in range(3):
        score_json(url, "a red circle", [png_bytes(700 + i), png_bytes(710 + i)]).raise_for_status()
    requests.post(f"{url}/v1/score", json={"prompt": "a cat", "images": [b64(png_bytes(1)), b64(png_bytes(2))],
                                           "model": "tiny-blip"}, timeout=60).raise_for_status()
    requests.post(f"{url}/v1/score_batch", data=wire.encode_pairs(["a", "b", "c"], [png_bytes(i) for i in range(3)]),
                  headers={"Content-Type": wire.CONTENT_TYPE}, timeout=60).raise_for_status()
    # One refusal per reason the ingress distinguishes (auth is covered by the token app's 401s).
    refusals = {
        "decode": {"prompt": "a cat", "images": [b64(b"not an image")]},
        "pixels": {"prompt": "a cat", "images": [b64(png_bomb(3000, 3000))]},
        "prompt": {"prompt": "   ", "images": [b64(png_bytes(1))]},
        "count": {"prompt": "a cat", "images": [b64(png_bytes(1))] * 9},
        "model": {"prompt": "a cat", "images": [b64(png_bytes(1))], "model": "no-such-model"},
    }
    for reason, body in refusals.items():
        assert 400 <= requests.post(f"{url}/v1/score", json=body, timeout=60).status_code < 500, reason
    big = requests.post(f"{url}/v1/score", data=b"x" * (3 << 20), headers={"Content-Type": "application/json"},
                        timeout=60)
    assert big.status_code == 413

    wanted = {
        ("ray_rayapp_images_scored_total", "model", "tiny-test"): 9,
        ("ray_rayapp_images_scored_total", "model", "tiny-blip"): 2,
        ("ray_rayapp_score_bucket_total", "le", "+Inf"): 11,
        ("ray_rayapp_model_seconds_count", "model", "tiny-test"): 1,
        ("ray_rayapp_batch_images_count", "model", "tiny-blip"): 1,
        ("ray_rayapp_batch_requests_count", "model", "tiny-test"): 1,
        ("ray_rayapp_preprocess_seconds_count", "route", "/v1/score_batch"): 1,
        ("ray_rayapp_rejections_total", "reason", "size"): 1,
        **{("ray_rayapp_rejections_total", "reason", reason): 1 for reason in refusals},
    }
    # Replicas push to the node's metrics agent every few seconds; the export follows.
    deadline, missing, text = time.time() + 120, dict(wanted), ""
    while missing and time.time() < deadline:
        time.sleep(3)
        with urllib.request.urlopen(metrics_url(), timeout=30) as resp:
            text = resp.read().decode()
        missing = {key: least for key, least in wanted.items()
                   if total(text, key[0], application="rm", **{key[1]: key[2]}) < least}
    assert not missing, f"not (yet) in Ray's Prometheus export: {missing}"
    # The score histogram is cumulative: every finite bucket holds at most the +Inf count. Each replica
    # process exports its own series, so sum them per bucket first.
    buckets: dict[str, float] = {}
    for labels, value in samples(text, "ray_rayapp_score_bucket_total"):
        if labels.get("model") == "tiny-test" and labels.get("application") == "rm":
            buckets[labels["le"]] = buckets.get(labels["le"], 0.0) + value
    assert len(buckets) > 1 and all(value <= buckets["+Inf"] for value in buckets.values()), buckets
    ordered = [buckets[le] for le in sorted((le for le in buckets if le != "+Inf"), key=float)]
    assert ordered == sorted(ordered), buckets
