"""The model deployment: every configured scorer in each replica, each with its own dynamic batching, plus
an optional LRU of user checkpoints loaded on first use (Serve model multiplexing)."""
from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict

import numpy as np
from ray import serve

from rayapp.serve.config import ModelSpec, MultiplexConfig
from rayapp.serve.metrics import get_metrics
from rayapp.serve.models import (
    ModelNotFoundError,
    ModelRunner,
    load_checkpoint,
    load_spec,
    weights_file,
    weights_identity,
)
from rayapp.serve.replica_logs import attach_to_serve_logs

logger = logging.getLogger(__name__)

BATCHING_KEYS = {"max_batch_size", "batch_wait_timeout_s"}
USER_CONFIG_KEYS = BATCHING_KEYS | {"models"}
DEFAULT_BATCHING = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01}


def _check_batching(where: str, values: dict) -> dict:
    unknown = set(values) - BATCHING_KEYS
    if unknown:
        raise ValueError(f"unknown {where} keys {sorted(unknown)}; allowed: {sorted(BATCHING_KEYS)}")
    out = {}
    if "max_batch_size" in values:
        out["max_batch_size"] = int(values["max_batch_size"])
        if out["max_batch_size"] < 1:
            raise ValueError(f"{where}.max_batch_size must be >= 1")
    if "batch_wait_timeout_s" in values:
        out["batch_wait_timeout_s"] = float(values["batch_wait_timeout_s"])
        if out["batch_wait_timeout_s"] < 0:
            raise ValueError(f"{where}.batch_wait_timeout_s must be >= 0")
    return out


def _identity(spec: ModelSpec) -> dict:
    """The configured model's weights digest; a file that cannot be found or read leaves it None (logged)."""
    try:
        return weights_identity(weights_file(spec))
    except (OSError, ValueError) as err:
        logger.warning("no weights digest for model %s: %s", spec.id, err)
        return weights_identity(None)


@serve.deployment(
    name="RewardScorer",
    # Enough queued requests per replica to fill a batch while the previous one runs.
    max_ongoing_requests=64,
    # Requests waiting for a free replica, per caller; past it the ingress answers 503 + Retry-After at once.
    max_queued_requests=128,
    backpressure_config={"retry_after_s": 1},
    ray_actor_options={"num_cpus": 1},
    user_config=DEFAULT_BATCHING,
)
class RewardScorer:
    """Scores preprocessed images with the model a request names; models load once, when the replica starts."""

    def __init__(self, models: list[dict], device: str | None = None, dtype: str | None = None,
                 num_threads: int | None = None, multiplex: dict | None = None):
        import torch

        attach_to_serve_logs()
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device, self.dtype = device, dtype
        self.metrics = get_metrics()
        self.batching = dict(DEFAULT_BATCHING)
        self.per_model: dict[str, dict] = {}
        specs = [ModelSpec.model_validate(m) for m in models]
        if not specs:
            raise ValueError("RewardScorer needs at least one model")
        self.default_id = specs[0].id
        self.runners: dict[str, ModelRunner] = {}
        for spec in specs:
            model = load_spec(spec, device, dtype)
            identity = _identity(spec)
            self.runners[spec.id] = ModelRunner(spec.id, model, self.batching["max_batch_size"],
                                                self.batching["batch_wait_timeout_s"], self.metrics, identity)
            logger.info("loaded model %s (%s from %s, weights sha256 %s)", spec.id, spec.scorer,
                        spec.source or "its default weights", identity["weights_sha256"])
        self.multiplex = MultiplexConfig.model_validate(multiplex) if multiplex else None
        self.user_runners: OrderedDict[str, ModelRunner] = OrderedDict()
        if self.multiplex:
            # Decorated per replica, so the LRU size comes from the config rather than the class body.
            self._get_user_runner = serve.multiplexed(
                max_num_models_per_replica=self.multiplex.max_models_per_replica)(self._user_loader())

    def _user_loader(self):
        async def load_user_checkpoint(model_id: str) -> ModelRunner:
            model, identity = await asyncio.to_thread(load_checkpoint, self.multiplex.checkpoint_root, model_id,
                                                      self.device, self.dtype)
            runner = _EvictableRunner(self, model_id, model, identity)
            self.user_runners[model_id] = runner
            logger.info("loaded user checkpoint %s (%d of at most %d in this replica)", model_id,
                        len(self.user_runners), self.multiplex.max_models_per_replica)
            return runner

        return load_user_checkpoint

    def reconfigure(self, config: dict) -> None:
        """Apply `user_config` (batching, default and per model) without reloading any model."""
        unknown = set(config) - USER_CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown RewardScorer user_config keys {sorted(unknown)}; "
                             f"allowed: {sorted(USER_CONFIG_KEYS)}")
        batching = {**DEFAULT_BATCHING, **_check_batching("user_config", {k: v for k, v in config.items()
                                                                          if k in BATCHING_KEYS})}
        per_model = {}
        for model_id, values in (config.get("models") or {}).items():
            if model_id not in self.runners:
                raise ValueError(f"user_config.models names {model_id!r}, which is not served; "
                                 f"served: {sorted(self.runners)}")
            per_model[model_id] = _check_batching(f"user_config.models.{model_id}", values or {})
        self.batching, self.per_model = batching, per_model
        for model_id, runner in {**self.runners, **self.user_runners}.items():
            settings = {**batching, **per_model.get(model_id, {})}
            runner.set_batching(settings["max_batch_size"], settings["batch_wait_timeout_s"])

    async def _runner(self, model_id: str | None) -> ModelRunner:
        if model_id is None or model_id in self.runners:
            return self.runners[model_id or self.default_id]
        if self.multiplex is None:
            raise ModelNotFoundError(f"model {model_id!r} is not served; served: {sorted(self.runners)}")
        return await self._get_user_runner(model_id)

    def info(self) -> dict:
        """Configured models (default first), multiplexing settings; what /v1/models and the ingress read."""
        return {
            "default": self.default_id,
            "models": [runner.info() for runner in self.runners.values()],
            "multiplex": None if self.multiplex is None else {
                "checkpoint_root": self.multiplex.checkpoint_root,
                "max_models_per_replica": self.multiplex.max_models_per_replica,
                **self.batching,
            },
            "pid": os.getpid(),
        }

    async def model_info(self, model_id: str | None) -> dict:
        """One model's info; a user checkpoint is loaded here (this call is routed like its scoring calls)."""
        return (await self._runner(model_id)).info()

    def loaded_user_models(self) -> list[str]:
        """User checkpoints held by this replica, least recently loaded first."""
        return list(self.user_runners)

    async def score(self, pixels: np.ndarray, prompts: list[str], model_id: str | None = None) -> dict:
        """Rewards for pixels[i] (uint8 [N,S,S,3]) under prompts[i] by the named (or default) model."""
        runner = await self._runner(model_id)
        result = await runner.score(pixels, prompts)
        result["model"] = runner.model_id
        return result


class _EvictableRunner(ModelRunner):
    """A user checkpoint's runner; when Serve's LRU evicts it, it leaves the replica's list and frees memory."""

    def __init__(self, owner: RewardScorer, model_id: str, model, identity: dict):
        settings = owner.batching
        super().__init__(model_id, model, settings["max_batch_size"], settings["batch_wait_timeout_s"], owner.metrics,
                         identity)
        self._owner = owner

    def close(self) -> None:
        owner = getattr(self, "_owner", None)
        if owner is not None and owner.user_runners.get(self.model_id) is self:
            owner.user_runners.pop(self.model_id, None)
            logger.info("evicted user checkpoint %s", self.model_id)
        self._owner = None
        super().close()
