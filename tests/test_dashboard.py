"""What a job says about the Ray dashboard. (The Train API listing a running job's run is tested with the job
itself: tests/test_train.py.)"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(600)

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
