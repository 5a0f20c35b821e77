"""The Serve application builder named by `serve_configs/*.yaml` (`import_path: rayapp.serve.app:build_app`)."""
from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from rayapp.serve.api import RewardAPI
from rayapp.serve.limits import ServeLimits
from rayapp.serve.scorer import RewardScorer


class AppArgs(BaseModel):
    """`args:` of the Serve config; per-deployment resources and autoscaling live under `deployments:`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("ImageReward-v1.0", description="name from available_models(), .pt file or save_pretrained dir")
    name: str | None = Field(None, description="model id reported by the API; defaults to `model`")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ...; None = cuda when the replica has a GPU")
    dtype: str | None = Field(None, description="float32, bfloat16, float16; None = the loader's default")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads per model replica")
    max_batch_size: int = Field(16, ge=1, description="images per forward pass (user_config overrides)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="wait for a batch to fill (user_config overrides)")
    limits: ServeLimits = Field(default_factory=ServeLimits)
    # For programmatic use (tests, benchmarks); YAML users set these under `deployments:` instead.
    scorer_options: dict = Field(default_factory=dict, description="Serve options for RewardScorer")
    api_options: dict = Field(default_factory=dict, description="Serve options for RewardAPI")


def build_app(args: AppArgs) -> Application:
    """Ingress -> model deployment, wired with a handle."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    model = args.model
    # A local checkpoint given relative to where the app is built is pinned so replicas find it anywhere.
    if os.path.exists(model):
        model = os.path.abspath(model)
    batching = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
    scorer = RewardScorer.options(**{"user_config": batching, **args.scorer_options}).bind(
        model, args.device, args.dtype, args.num_threads, args.name or args.model
    )
    return RewardAPI.options(**args.api_options).bind(scorer, args.limits.model_dump())
