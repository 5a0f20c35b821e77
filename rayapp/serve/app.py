"""The Serve application builder named by `serve_configs/*.yaml` (`import_path: rayapp.serve.app:build_app`)."""
from __future__ import annotations

import logging
import os

from ray.serve import Application

from rayapp import ray_compat
from rayapp.data.storage import is_uri
from rayapp.serve.api import RewardAPI
from rayapp.serve.config import AppArgs, ModelSpec, MultiplexConfig
from rayapp.serve.resources import (
    DeploymentDemand,
    UnschedulableError,
    check_application,
    initial_replicas,
    replica_resources,
)
from rayapp.serve.scorer import RewardScorer

__all__ = ["AppArgs", "build_app"]

logger = logging.getLogger(__name__)
IMPORT_PATH = "rayapp.serve.app:build_app"


def _pinned(source: str | None) -> str | None:
    """A local checkpoint given relative to where the app is built, made absolute so replicas find it anywhere."""
    if source and not is_uri(source) and os.path.exists(source):
        return os.path.abspath(source)
    return source


def _pin_spec(spec: ModelSpec) -> ModelSpec:
    options = dict(spec.options)
    if options.get("weights"):
        options["weights"] = _pinned(options["weights"])
    return spec.model_copy(update={"source": _pinned(spec.source), "options": options})


def _config_overrides(args: AppArgs) -> list[dict[str, dict]]:
    """`deployments:` of the Serve config(s) being deployed with these args (Serve applies them after the build).

    Read from the controller, which stores the config before it starts the build. The build does not learn its
    application's name, so every application now deploying with equal args is a candidate; [] when built
    outside a config deploy (serve.run, `serve run module:build_app`).
    """
    candidates = []
    try:
        details = ray_compat.serve_details()
        if details is None:
            return []
        for app in details.get("applications", {}).values():
            config = app.get("deployed_app_config") or {}
            if config.get("import_path") != IMPORT_PATH or app.get("status") not in ("DEPLOYING", "NOT_STARTED"):
                continue
            if AppArgs.model_validate(config.get("args") or {}) == args:
                # Unset options may come back as None: they do not override the code's values.
                candidates.append({d["name"]: {k: v for k, v in d.items() if v is not None}
                                   for d in config.get("deployments") or []})
    except Exception:  # a private controller API (rayapp.ray_compat); the check then uses the code's options only
        logger.debug("could not read the deployed config's overrides", exc_info=True)
    return candidates


def _demand(name: str, deployment, override: dict, options: dict | None = None) -> DeploymentDemand:
    """What `deployment` (with the `.options()` given as `options`) asks for once the config's `override` applies.

    Replica counts come from the override, else from `options`, else from the deployment's own num_replicas;
    autoscaling deployments start with their initial (or minimum) replicas.
    """
    options = options or {}
    actor_options = override.get("ray_actor_options", deployment.ray_actor_options)
    num_replicas = override.get("num_replicas", options.get("num_replicas", deployment.num_replicas))
    autoscaling = override.get("autoscaling_config", options.get("autoscaling_config"))
    autoscaled = ("autoscaling_config" in override or num_replicas in (None, "auto")
                  or ("autoscaling_config" in options and "num_replicas" not in override))
    replicas = initial_replicas(None, autoscaling) if autoscaled else initial_replicas(num_replicas, None)
    return DeploymentDemand(name, replica_resources(actor_options), replicas)


def _check_resources(args: AppArgs, deployments: dict) -> None:
    """Refuse an application whose replicas can never be scheduled here (see rayapp.serve.resources)."""
    import ray

    if args.resource_check.mode == "off" or not ray.is_initialized():
        return
    candidates = _config_overrides(args) or [{}]
    mode = args.resource_check.mode
    if len(candidates) > 1 and mode != "warn":
        # Several applications deploy these very args: fail only if none of them could run, else warn.
        failures = []
        for overrides in candidates:
            try:
                _check_one(deployments, overrides, mode, args.resource_check.wait_s)
            except UnschedulableError as err:
                failures.append(err)
        if len(failures) == len(candidates):
            raise failures[0]
        for err in failures:
            logger.warning("one of %d applications with these args cannot be scheduled: %s", len(candidates), err)
        return
    _check_one(deployments, candidates[0], mode, args.resource_check.wait_s)


def _check_one(deployments: dict, overrides: dict, mode: str, wait_s: float) -> None:
    demands = [_demand(name, deployment, overrides.get(name, {}), options)
               for name, (deployment, options) in deployments.items()]
    check_application(demands, mode, wait_s)


def build_app(args: AppArgs) -> Application:
    """Ingress -> model deployment (every configured model, optional user-checkpoint LRU), wired with a handle."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    specs = [_pin_spec(spec) for spec in args.model_specs()]
    multiplex = args.multiplex
    if multiplex is not None:
        multiplex = MultiplexConfig(**{**multiplex.model_dump(), "checkpoint_root": _pinned(multiplex.checkpoint_root)})
    batching = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
    scorer = RewardScorer.options(**{"user_config": batching, **args.scorer_options})
    api = RewardAPI.options(**args.api_options)
    _check_resources(args, {"RewardScorer": (scorer, args.scorer_options), "RewardAPI": (api, args.api_options)})
    bound_scorer = scorer.bind([spec.model_dump() for spec in specs], args.device, args.dtype, args.num_threads,
                               multiplex.model_dump() if multiplex else None)
    return api.bind(bound_scorer, args.limits.model_dump(), args.auth.model_dump() if args.auth else None,
                    args.cors.model_dump() if args.cors else None, args.decode_threads)
