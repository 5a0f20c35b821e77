"""Ray clusters as the jobs meet them: connect, size the train workers to the cluster, fail fast on a request
the cluster can never meet, say where the workers run."""
from __future__ import annotations

import contextlib
import logging
import os
import socket

from rayapp import ray_compat

from .config import TrainingConfig

logger = logging.getLogger(__name__)

# CPUs left to Ray Data's tasks and the driver when workers are sized automatically: without it, workers that
# hold every CPU starve the data pipeline feeding them (it waits for a CPU forever).
DATA_CPU_RESERVE = 1.0


class ResourceRequestError(RuntimeError):
    """The cluster can never satisfy what a job or deployment asked for."""


STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"
DEFAULT_DASHBOARD_PORT = 8265  # Ray's, kept for the local Ray while it is free
# Ray's switches for console lines of a job's own local Ray that a user cannot act on (`--verbose` keeps Ray's
# defaults). Only for the local Ray: a cluster's raylets and Train settings belong to whoever runs the cluster.
_LOCAL_QUIET_ENV = {
    # Train's preemption watcher waits for node drains, which a one-machine Ray never has; starting it logs a C++
    # error about its constructor arguments from the train controller.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The raylet warns ("N PYTHON worker processes ... 4x the maximum expected startup concurrency") once a job's
    # controller, train workers and Ray Data tasks outnumber 4x its startup concurrency, by default the CPU count:
    # a small machine reaches it by design (fractional-CPU workers). The warning scales with this setting.
    "RAY_worker_maximum_startup_concurrency": str(max(8, os.cpu_count() or 1)),
}


def connect(verbose: bool = False, **kwargs) -> None:
    """Connect to RAY_ADDRESS (set under `ray job submit`) or start a local Ray sized like this machine.

    Turns on Ray Train's state tracking (read by `TorchTrainer.fit` in this process), so the dashboard's Train API
    lists the run, and logs the dashboard's address once, with how to sign in when token auth is on.
    Unless `verbose`: every Ray process of the job (train controller, workers, Ray Data coordinators) starts with
    `rayapp.logs.quiet_ray_process`, and the messages a user cannot act on stay out of the console
    (`_LOCAL_QUIET_ENV`, Ray's own INFO/WARNING lines while connecting).
    """
    import ray

    from rayapp.logs import setup_logging

    if ray.is_initialized():
        return
    os.environ.setdefault(STATE_TRACKING_ENV, "1")
    if not verbose:
        kwargs.setdefault("runtime_env", {"worker_process_setup_hook": "rayapp.logs.quiet_ray_process"})
    # "ray" logger of this process while connecting: the token-auth notice and "Started a local Ray instance"
    kwargs.setdefault("logging_level", logging.INFO if verbose else logging.ERROR)
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(**kwargs)
    else:
        env = {} if verbose else dict(_LOCAL_QUIET_ENV)
        if kwargs.get("include_dashboard") is not False:
            # Ray Train's placement-group cleaner and state actor call Ray's state API without an address; with
            # another Ray on the machine its auto-detection fails ("Found multiple active Ray instances") and
            # their monitor threads die. Pin the dashboard's port and name it to every process of this Ray.
            kwargs.setdefault("dashboard_port", _free_port(DEFAULT_DASHBOARD_PORT))
            host = kwargs.get("dashboard_host", "127.0.0.1")
            env["RAY_API_SERVER_ADDRESS"] = f"http://{host}:{kwargs['dashboard_port']}"
        with _environ(env):  # the local Ray's processes inherit it
            context = ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    setup_logging(verbose)  # importing Ray re-configures its loggers: apply our levels again
    if context.dashboard_url:
        url = context.dashboard_url
        logger.info("%s", dashboard_hint(url if url.startswith(("http://", "https://")) else f"http://{url}"))


def _free_port(preferred: int) -> int:
    """`preferred` if it is free on 127.0.0.1 now, else a free port the system picks."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set `values` (unless already set) in os.environ for the block, then restore what was there."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def dashboard_hint(url: str) -> str:
    """One line: where the Ray dashboard is and, with token auth on (RAY_AUTH_MODE=token), where its token is."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return f"Ray dashboard: {url}"
    # Ray reads the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token.
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "the RAY_AUTH_TOKEN environment variable"
    else:
        where = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    return (f"Ray dashboard: {url} (token auth is on: it asks for the token in {where}; "
            "`ray get-auth-token` prints it)")


def cluster_capacity() -> tuple[dict[str, float], list[dict[str, float]]]:
    """(total resources, resources of each alive node) of the connected cluster."""
    import ray

    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def worker_resources(config: TrainingConfig, job: str) -> dict[str, float]:
    """Resources one train worker reserves; checks now that the cluster can ever place all of them.

    With `cpus_per_worker` unset, each worker gets at most one CPU and the workers together leave
    DATA_CPU_RESERVE CPUs free (a 2-CPU machine with 2 workers: 0.5 each). Raises ResourceRequestError naming
    the job, the request and the cluster's resources unless `wait_for_resources` is set.
    """
    total, nodes = cluster_capacity()
    cpus = config.cpus_per_worker
    if cpus is None:
        free = max(total.get("CPU", 0.0) - DATA_CPU_RESERVE, 0.0)
        cpus = max(0.1, min(1.0, round(free / config.num_workers, 2) if free else 0.1))
    request = {"CPU": float(cpus)}
    if config.use_gpu:
        request["GPU"] = 1.0
    if not config.wait_for_resources:
        check_placeable(job, f"{config.num_workers} train workers", request, config.num_workers, total, nodes)
    return request


def check_placeable(job: str, what: str, per_item: dict[str, float], count: int, total: dict[str, float],
                    nodes: list[dict[str, float]]) -> None:
    """Raise ResourceRequestError unless `count` bundles of `per_item` fit the cluster's nodes (by capacity)."""
    have = {k: round(v, 2) for k, v in total.items() if k in ("CPU", "GPU") or k in per_item}
    missing = [k for k, v in per_item.items() if v > 0 and total.get(k, 0.0) <= 0]
    fits = sum(int(min(node.get(k, 0.0) / v for k, v in per_item.items() if v > 0) + 1e-9) for node in nodes)
    if not missing and fits >= count:
        return
    if "GPU" in missing:
        hint = " This cluster has no GPU: pass --use-gpu false (CPU), or connect to a cluster with GPU nodes."
    elif missing:
        hint = f" No node offers {', '.join(missing)}."
    else:
        hint = " Ask for fewer workers or fewer CPUs per worker (--num-workers, --cpus-per-worker), or add nodes."
    raise ResourceRequestError(
        f"{job}: {what} x {per_item} can never be placed: the cluster has {have} on {len(nodes)} node(s), "
        f"room for {fits}.{hint} (--wait-for-resources waits for an autoscaler instead.)")


def log_worker_nodes(prefix: str = "[workers]") -> list[str]:
    """Collective: every rank's node IP; rank 0 logs them in rank order ("[workers] node IPs: a, b")."""
    import ray
    import torch

    ip = ray.util.get_node_ip_address()
    ips = [ip]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ips = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ips, ip)
        if torch.distributed.get_rank() != 0:
            return ips
    logger.info("%s node IPs: %s", prefix, ", ".join(ips))
    return ips


def quiet_report_log() -> None:
    """Silence Ray Train's INFO line per `ray.train.report` (the whole metrics dict, from every rank); the
    loops log their own one-line progress on rank 0 instead. Logs at debug, and goes on, where Ray moved it."""
    try:
        ray_compat.quiet_train_report_log()
    except (ImportError, AttributeError):  # tests/test_ray_compat.py names what moved
        logger.debug("Ray Train's report logger not found", exc_info=True)


def quiet_data_progress_bars() -> None:
    """No Ray Data progress bars for datasets built after this call in this process (the driver).

    Training re-splits its datasets every epoch and each split's bar reaches the driver as a stream of
    carriage-return lines; the loop's own progress line says the same.
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
