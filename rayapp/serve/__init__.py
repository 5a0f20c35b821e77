"""Ray Serve reward endpoint: `app.build_app` (deployments); `client.RewardClient` / `client.AsyncRewardClient`
/ `client.make_reward_fn` / `client.make_ddpo_reward_fn` / `client.compute_score` (HTTP clients, no Ray needed)."""
from __future__ import annotations

__all__ = ["AsyncRewardClient", "RewardClient", "build_app", "compute_score", "make_ddpo_reward_fn", "make_reward_fn"]

_CLIENT = {"RewardClient", "AsyncRewardClient", "compute_score", "make_ddpo_reward_fn", "make_reward_fn"}


def __getattr__(name: str):
    # Lazy, so `from rayapp.serve.client import RewardClient` never imports Ray or FastAPI.
    if name in _CLIENT:
        from rayapp.serve import client

        return getattr(client, name)
    if name == "build_app":
        from rayapp.serve.app import build_app

        return build_app
    raise AttributeError(name)
