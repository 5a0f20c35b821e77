"""Ray Serve reward endpoint: `app.build_app` (deployments), `client.RewardClient` (HTTP client, no Ray needed)."""
from __future__ import annotations

__all__ = ["RewardClient", "build_app"]


def __getattr__(name: str):
    # Lazy, so `from rayapp.serve.client import RewardClient` never imports Ray or FastAPI.
    if name == "RewardClient":
        from rayapp.serve.client import RewardClient

        return RewardClient
    if name == "build_app":
        from rayapp.serve.app import build_app

        return build_app
    raise AttributeError(name)
