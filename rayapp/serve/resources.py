"""Fail fast when a deployment asks for resources no node of the cluster can ever give it.

Without this check Serve waits forever ("taken more than 30s to be scheduled") for, e.g., a GPU on a
CPU-only cluster, or for 3 CPUs of replicas on a 2-CPU machine. The builder calls `check_application`
before the application is deployed: a request no node (present, or an autoscaler node type) can hold is an
error that names the deployment, what it asked for and what the cluster has.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from rayapp import ray_compat

logger = logging.getLogger(__name__)

# Keys of node resources that say nothing about capacity for a replica.
_IGNORED = ("node:", "accelerator_type:", "object_store_memory")
_READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]{16,}$")


class UnschedulableError(RuntimeError):
    """A deployment's replicas can never be scheduled on this cluster."""


@dataclass
class DeploymentDemand:
    """What one deployment asks for: resources per replica and the replicas it starts with."""

    name: str
    per_replica: dict[str, float]
    replicas: int


def replica_resources(ray_actor_options: dict | None) -> dict[str, float]:
    """Ray resources one replica reserves (Serve reserves 1 CPU when num_cpus is not given)."""
    options = ray_actor_options or {}
    cpus = options.get("num_cpus")
    demand = {"CPU": 1.0 if cpus is None else float(cpus), "GPU": float(options.get("num_gpus") or 0),
              "memory": float(options.get("memory") or 0)}
    demand.update({key: float(value) for key, value in (options.get("resources") or {}).items()})
    return {key: value for key, value in demand.items() if value > 0}


def initial_replicas(num_replicas, autoscaling_config) -> int:
    """Replicas a deployment starts with: num_replicas, or autoscaling's initial/min replicas (at least 1)."""
    if isinstance(num_replicas, int):
        return num_replicas
    auto = autoscaling_config if isinstance(autoscaling_config, dict) else \
        (autoscaling_config.model_dump() if autoscaling_config is not None else {})
    start = auto.get("initial_replicas")
    return int(start if start is not None else max(1, auto.get("min_replicas") or 1))


def _capacity(node: dict) -> dict[str, float]:
    return {key: float(value) for key, value in node.items() if not key.startswith(_IGNORED)}


def _fits(demand: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(key, 0.0) + 1e-9 >= value for key, value in demand.items())


def _show(resources: dict[str, float]) -> str:
    parts = []
    for key, value in sorted(resources.items()):
        if key == "memory":
            parts.append(f"memory {value / 2**30:.1f} GiB")
        else:
            parts.append(f"{key} {value:g}")
    return "{" + ", ".join(parts) + "}"


def find_problems(demands: list[DeploymentDemand], nodes: list[dict]) -> list[str]:
    """Why these deployments can never all start on `nodes` (resource dicts), or [] when they can."""
    capacities = [_capacity(node) for node in nodes]
    shown = ", ".join(_show(c) for c in capacities) or "no nodes"
    problems = [
        f"deployment {d.name} asks for {_show(d.per_replica)} per replica, but no node of the cluster has that "
        f"(nodes: {shown})"
        for d in demands if not any(_fits(d.per_replica, c) for c in capacities)
    ]
    if problems:
        return problems
    # First-fit decreasing on empty nodes: if even that fails, the replicas can never run side by side.
    free = [dict(c) for c in capacities]
    replicas = sorted(((d.name, d.per_replica) for d in demands for _ in range(d.replicas)),
                      key=lambda item: -sum(item[1].values()))
    for name, demand in replicas:
        node = next((f for f in free if _fits(demand, f)), None)
        if node is None:
            asked = "; ".join(f"{d.name}: {d.replicas} x {_show(d.per_replica)}" for d in demands)
            return [(f"the initial replicas together ({asked}) do not fit the cluster (nodes: {shown}); "
                    f"{name} is the first left without room. Lower num_cpus (fractions are fine) or the replica "
                    "counts, or add nodes")]
        for key, value in demand.items():
            node[key] = node.get(key, 0.0) - value
    return []


def cluster_nodes() -> list[dict]:
    """Total resources of each alive node."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def autoscaler_node_types() -> list[dict] | None:
    """Resources of the node types an autoscaler may add ([] for an autoscaler of unknown types); None: none.

    Autoscaler v2 (KubeRay, `ray up` with v2) keeps its node groups in the GCS. A v1 autoscaler only shows in
    its status report, as node types with real names; a plain `ray start` cluster has a read-only monitor
    whose node types are the nodes' own ids (`node_<id>`), i.e. no autoscaler.
    """
    try:
        groups = ray_compat.autoscaler_node_groups()
        if groups is not None:
            return groups
    except Exception:  # a private API (rayapp.ray_compat); absent or changed means "unknown"
        logger.debug("could not read the autoscaler's cluster config", exc_info=True)
    try:
        if any(not _READONLY_NODE_TYPE.match(node_type) for node_type in ray_compat.autoscaler_v1_node_types()):
            return []
    except Exception:
        logger.debug("could not read the autoscaler status", exc_info=True)
    return None


def check_application(demands: list[DeploymentDemand], mode: str = "auto", wait_s: float = 0.0) -> None:
    """Raise UnschedulableError (mode fail/auto) or log a warning (warn) for demands that can never be met."""
    if mode == "off":
        return
    deadline = time.monotonic() + wait_s
    while True:
        node_types = autoscaler_node_types() if mode == "auto" else None
        nodes = cluster_nodes() + (node_types or [])
        problems = find_problems(demands, nodes)
        if not problems or time.monotonic() >= deadline:
            break
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))  # nodes may still be joining
    if not problems:
        return
    message = "; ".join(problems)
    if mode == "warn" or (mode == "auto" and node_types == []):
        logger.warning("%s (an autoscaler may add nodes; waiting for it)", message)
        return
    raise UnschedulableError(message + ". Serve would wait forever for these resources, so the application is not "
                             "deployed (set args.resource_check.mode: warn to deploy anyway).")
