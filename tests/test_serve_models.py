"""Several models behind one endpoint: configured scorers picked by `model`, and multiplexed user checkpoints."""
from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import requests
from conftest import SERVE_TEST_CHECKPOINTS, SERVE_TEST_MAX_USER_MODELS
from test_serve import b64, png_bytes, score_json

pytestmark = pytest.mark.timeout(300)


def _one_scorer_replica() -> bool:
    from ray import serve

    states = serve.status().applications["rm"].deployments["RewardScorer"].replica_states
    return states.get("RUNNING", 0) == 1 and sum(states.values()) == 1


def _scorer_handle(model_id: str):
    from ray import serve

    return serve.get_deployment_handle("RewardScorer", "rm").options(multiplexed_model_id=model_id)


def test_two_models_give_their_own_library_scores(serve_app):
    import rayapp

    images = [png_bytes(500 + i) for i in range(4)]
    prompt = "two red circles on a blue background"
    reward = rayapp.load(serve_app.model_dir, device="cpu", dtype="float32").score(prompt, images)
    blip = rayapp.load_score("BLIP", serve_app.blip_dir, device="cpu").score(prompt, images)
    assert not np.allclose(reward, blip, atol=1e-3), "the two models must differ for this test to mean anything"

    default = score_json(serve_app.url, prompt, images).json()
    assert default["model"] == "tiny-test"
    np.testing.assert_allclose(default["scores"], reward, rtol=1e-4, atol=1e-5)

    by_body = requests.post(f"{serve_app.url}/v1/score", timeout=60,
                            json={"prompt": prompt, "images": [b64(i) for i in images], "model": "tiny-blip"}).json()
    assert by_body["model"] == "tiny-blip"
    np.testing.assert_allclose(by_body["scores"], blip, rtol=1e-4, atol=1e-5)

    # multipart with ?model=, and score_pairs with the model in the form
    files = [("images", (f"{i}.png", img, "image/png")) for i, img in enumerate(images)]
    by_query = requests.post(f"{serve_app.url}/v1/score?model=tiny-blip", data={"prompt": prompt}, files=files,
                             timeout=60).json()
    np.testing.assert_allclose(by_query["scores"], blip, rtol=1e-4, atol=1e-5)
    pairs = requests.post(f"{serve_app.url}/v1/score_pairs", files=files,
                          data={"prompts": [prompt] * 4, "model": "tiny-test"}, timeout=60).json()
    np.testing.assert_allclose(pairs["scores"], reward, rtol=1e-4, atol=1e-5)


def test_models_route_lists_models_and_limits(serve_app):
    body = requests.get(f"{serve_app.url}/v1/models", timeout=30).json()
    assert body["default"] == "tiny-test"
    assert [m["id"] for m in body["models"]] == ["tiny-test", "tiny-blip"]
    first, second = body["models"]
    assert first["default"] is True and second["default"] is False
    assert first["scorer"] == "ImageReward" and second["scorer"] == "BLIP"
    assert first["image_size"] == 64 and first["max_batch_size"] == 16
    assert body["limits"]["max_images"] == 8 and body["limits"]["max_batch_pairs"] == 256
    assert body["multiplex"]["max_models_per_replica"] == SERVE_TEST_MAX_USER_MODELS
    assert body["auth_required"] is False and body["request_id"]


def test_unknown_or_unsafe_model_is_refused(serve_app):
    good = b64(png_bytes(1))
    cases = {
        "nope": (404, "no checkpoint"),
        "../etc/passwd": (404, "checkpoint id"),
        "users/../../x": (404, "checkpoint id"),
        "/etc": (404, "checkpoint id"),
        "": (422, "must not be empty"),
    }
    for model, (status, needle) in cases.items():
        resp = requests.post(f"{serve_app.url}/v1/score", json={"prompt": "a cat", "images": [good], "model": model},
                             timeout=60)
        assert resp.status_code == status, f"{model!r}: {resp.status_code} {resp.text}"
        body = resp.json()
        assert body["field"] == "model" and needle in body["detail"], body
    resp = requests.post(f"{serve_app.url}/v1/score?model=tiny-test", timeout=60,
                         json={"prompt": "a cat", "images": [good], "model": "tiny-blip"})
    assert resp.status_code == 422 and resp.json()["field"] == "model"
    score_json(serve_app.url, "a cat", [png_bytes(2)]).raise_for_status()


def test_user_checkpoints_load_on_first_use_and_are_evicted_past_n(serve_app):
    import rayapp

    # One model replica, so the LRU of that replica is the whole story.
    deadline = time.time() + 90
    while not _one_scorer_replica():
        assert time.time() < deadline, "the model deployment did not settle at one replica"
        time.sleep(0.5)
    root = serve_app.checkpoint_root
    first = SERVE_TEST_CHECKPOINTS[0]
    assert first not in _scorer_handle(first).loaded_user_models.remote().result(timeout_s=60)

    images = [png_bytes(600 + i) for i in range(3)]
    prompt = "a small blue square"
    for name in SERVE_TEST_CHECKPOINTS:
        expected = rayapp.load(root / name, device="cpu").score(prompt, images)
        resp = requests.post(f"{serve_app.url}/v1/score", timeout=120,
                             json={"prompt": prompt, "images": [b64(i) for i in images], "model": name})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == name
        weights = (root / name / "model.safetensors").read_bytes()
        assert resp.json()["weights_sha256"] == hashlib.sha256(weights).hexdigest()  # the checkpoint's own digest
        np.testing.assert_allclose(resp.json()["scores"], expected, rtol=1e-4, atol=1e-5)
        loaded = _scorer_handle(name).loaded_user_models.remote().result(timeout_s=60)
        assert name in loaded and len(loaded) <= SERVE_TEST_MAX_USER_MODELS, loaded

    # Three checkpoints through an LRU of two: the first one was evicted, the last two stay.
    last = SERVE_TEST_CHECKPOINTS[-1]
    loaded = _scorer_handle(last).loaded_user_models.remote().result(timeout_s=60)
    assert loaded == list(SERVE_TEST_CHECKPOINTS[-SERVE_TEST_MAX_USER_MODELS:]), loaded
    # Using the evicted one again loads it again (and evicts the least recently used).
    resp = requests.post(f"{serve_app.url}/v1/score_batch?model={first}", timeout=120,
                         json={"prompts": [prompt], "images": [b64(images[0])]})
    assert resp.status_code == 200, resp.text
    loaded = _scorer_handle(first).loaded_user_models.remote().result(timeout_s=60)
    assert loaded == [SERVE_TEST_CHECKPOINTS[-1], first], loaded
    # The configured models were never touched by the LRU.
    score_json(serve_app.url, prompt, images[:1]).raise_for_status()


def test_checkpoint_ids_stay_under_the_root_and_uris_resolve(tmp_path, tiny_rm_dir):
    import os
    import shutil

    from rayapp.data import storage
    from rayapp.serve.models import ModelNotFoundError, resolve_checkpoint

    root = tmp_path / "root"
    shutil.copytree(tiny_rm_dir, root / "team" / "good")
    os.symlink(tiny_rm_dir, root / "team" / "escape")  # a link inside the root to a checkpoint outside it
    good = os.fspath((root / "team" / "good").resolve())
    assert resolve_checkpoint(str(root), "team/good") == good
    for bad in ("team/escape", "../outside", "team/../../outside", "/etc", "team//good", "team/missing"):
        with pytest.raises(ModelNotFoundError):
            resolve_checkpoint(str(root), bad)
    # URIs: file:// resolves in place; an object-store root joins the id to the prefix.
    assert resolve_checkpoint("s3://bucket/ckpts/", "team/run-1") == "s3://bucket/ckpts/team/run-1"
    assert resolve_checkpoint(f"file://{root}", "team/good") == good
    assert storage.local_path(f"file://{tiny_rm_dir}") == str(tiny_rm_dir)
