"""Bearer token, CORS allow-list, request ids and the typed OpenAPI schema, on a second app with a token."""
from __future__ import annotations

import glob
import os
import time

import numpy as np
import pytest
import requests
from test_serve import b64, png_bytes

from rayapp.serve import wire

pytestmark = pytest.mark.timeout(300)

TOKEN = "test-token-0123456789-abcdefghij"
ALLOWED_ORIGIN = "https://labeling.example.com"
PREFIX = "/secure"


@pytest.fixture(scope="module")
def secure_url(serve_manager, tmp_path_factory):
    """The tiny model behind a token (read from a file, as a mounted Kubernetes Secret) and a CORS allow-list."""
    from ray import serve

    from rayapp.serve.app import build_app

    serve_manager.ensure()
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    args = serve_manager.args(
        models=[{"id": "tiny-test", "source": str(serve_manager.model_dir)}], multiplex=None,
        auth={"token_file": str(token_file)}, cors={"allow_origins": [ALLOWED_ORIGIN]},
        scorer_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        api_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
    )
    serve.run(build_app(args), name="rm-secure", route_prefix=PREFIX)
    try:
        yield f"http://127.0.0.1:{serve_manager.port}{PREFIX}"
    finally:
        serve.delete("rm-secure")


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_token_required_on_v1_routes_but_not_healthz(secure_url):
    assert requests.get(f"{secure_url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{secure_url}/openapi.json", timeout=30).status_code == 200
    body = {"prompt": "a red circle", "images": [b64(png_bytes(1))]}
    for name, headers in {"missing": {}, "wrong": auth("x" * len(TOKEN)), "prefix": auth(TOKEN[:-1]),
                          "longer": auth(TOKEN + "x"), "basic": {"Authorization": f"Basic {TOKEN}"}}.items():
        for resp in (requests.post(f"{secure_url}/v1/score", json=body, headers=headers, timeout=30),
                     requests.get(f"{secure_url}/v1/models", headers=headers, timeout=30),
                     requests.post(f"{secure_url}/v1/score_batch",
                                   headers={**headers, "Content-Type": wire.CONTENT_TYPE},
                                   data=wire.encode_pairs(["a"], [png_bytes(1)]), timeout=30)):
            assert resp.status_code == 401, f"{name}: {resp.status_code} {resp.text}"
            assert resp.headers["www-authenticate"].startswith("Bearer")
            error = resp.json()
            assert error["field"] == "authorization" and error["request_id"], error
    ok = requests.post(f"{secure_url}/v1/score", json=body, headers=auth(), timeout=60)
    assert ok.status_code == 200, ok.text
    lower = requests.get(f"{secure_url}/v1/models", headers={"Authorization": f"bearer {TOKEN}"}, timeout=30)
    assert lower.status_code == 200 and lower.json()["auth_required"] is True


def test_clients_send_the_token(secure_url):
    from rayapp.serve.client import RewardClient, RewardServiceError, make_reward_fn

    image = png_bytes(3)
    with pytest.raises(RewardServiceError) as err:
        RewardClient(secure_url, token="").score("a cat", [image])
    assert err.value.status == 401 and err.value.field == "authorization"
    scores = RewardClient(secure_url, token=TOKEN).score("a cat", [image])
    with make_reward_fn(secure_url, token=TOKEN) as reward_fn:
        np.testing.assert_allclose(reward_fn([image], ["a cat"]), scores, rtol=1e-5)


def test_cors_allow_list(secure_url):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = requests.options(f"{secure_url}/v1/score", headers={"Origin": ALLOWED_ORIGIN, **preflight}, timeout=30)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = requests.options(f"{secure_url}/v1/score", headers={"Origin": "https://evil.example", **preflight},
                             timeout=30)
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    simple = requests.get(f"{secure_url}/healthz", headers={"Origin": ALLOWED_ORIGIN}, timeout=30)
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "access-control-allow-origin" not in requests.get(f"{secure_url}/healthz", timeout=30,
                                                             headers={"Origin": "https://evil.example"}).headers


def test_request_id_in_headers_bodies_and_log_lines(secure_url, ray_cluster):
    mine = f"trace-{os.getpid()}-{time.time_ns()}"
    ok = requests.post(f"{secure_url}/v1/score", headers={**auth(), "X-Request-ID": mine}, timeout=60,
                       json={"prompt": "a cat", "images": [b64(png_bytes(4))]})
    assert ok.headers["x-request-id"] == mine and ok.json()["request_id"] == mine
    bad_id = f"bad-{mine}"
    bad = requests.post(f"{secure_url}/v1/score", headers={**auth(), "X-Request-ID": bad_id}, timeout=60,
                        json={"prompt": "  ", "images": [b64(png_bytes(4))]})
    assert bad.status_code == 422 and bad.json()["request_id"] == bad_id and bad.headers["x-request-id"] == bad_id
    generated = requests.get(f"{secure_url}/v1/models", headers=auth(), timeout=30)
    assert generated.json()["request_id"] and generated.json()["request_id"] == generated.headers["x-request-id"]
    denied = requests.get(f"{secure_url}/v1/models", headers={"X-Request-ID": f"denied-{mine}"}, timeout=30)
    assert denied.json()["request_id"] == f"denied-{mine}"

    # Our own log lines (the refusals) carry the id too, in the ingress replica's Serve log.
    pattern = os.path.join(ray_cluster.temp_dir, "session_latest", "logs", "serve", "replica_rm-secure_RewardAPI_*.log")
    deadline = time.time() + 30
    while time.time() < deadline:
        lines = [line for path in glob.glob(pattern) for line in open(path, errors="replace")]
        refused = [line for line in lines if "refused" in line and bad_id in line]
        if refused and any(f"denied-{mine}" in line and "refused" in line for line in lines):
            break
        time.sleep(1)
    else:
        pytest.fail(f"no refusal log line with the request id in {pattern}")


def test_openapi_types_responses_and_errors(secure_url):
    spec = requests.get(f"{secure_url}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    assert {"detail", "field", "request_id"} <= set(schemas["ErrorResponse"]["properties"])
    routes = {"/v1/score": "ScoreResponse", "/v1/score_pairs": "PairsResponse", "/v1/score_batch": "PairsResponse",
              "/v1/models": "ModelsResponse"}
    for path, model in routes.items():
        operation = next(iter(spec["paths"][path].values()))
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert ok.endswith(f"/{model}"), (path, ok)
        for status in ("401", "413", "422", "503"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert error.endswith("/ErrorResponse"), (path, status)
    batch_body = spec["paths"]["/v1/score_batch"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", wire.CONTENT_TYPE} <= set(batch_body)
    assert "RWP1" in batch_body[wire.CONTENT_TYPE]["schema"]["description"]


def test_token_sources_and_weak_tokens(tmp_path, monkeypatch):
    from rayapp.serve.config import AuthConfig
    from rayapp.serve.gateway import load_token

    monkeypatch.setenv("RAYAPP_TEST_TOKEN", TOKEN)
    assert load_token(AuthConfig(token_env="RAYAPP_TEST_TOKEN")) == TOKEN.encode()
    monkeypatch.setenv("RAYAPP_TEST_TOKEN", "short")
    with pytest.raises(ValueError, match="RAYAPP_TEST_TOKEN.*at least 16"):
        load_token(AuthConfig(token_env="RAYAPP_TEST_TOKEN"))
    with pytest.raises(ValueError, match="does not exist"):
        load_token(AuthConfig(token_file=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="exactly one"):
        AuthConfig(token_env="A", token_file="B")
