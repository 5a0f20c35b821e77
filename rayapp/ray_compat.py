"""The one home of the private Ray APIs rayapp relies on, each with the reason no public API serves.

Everything else in rayapp uses Ray's public API only. tests/test_ray_compat.py resolves every entry of
PRIVATE_APIS, so a Ray upgrade that moves one fails there, by name, instead of somewhere deep in a job.
Imports happen on first use: importing this module costs nothing and does not import Ray.
"""
from __future__ import annotations

import importlib
import json
import logging

# module:attribute[.attribute...] -> why no public API serves. Code below resolves its entries through `private`,
# so this table is the complete list of what a Ray upgrade can break here.
PRIVATE_APIS: dict[str, str] = {
    # Serve's public `serve.status()` reports each application's status but not the config it is deploying; the
    # only other reader is the dashboard's REST API, whose address and token a build task cannot learn publicly.
    "ray.serve.context:_get_global_client":
        "the deploying applications' configs (`deployments:` overrides) while the builder runs",
    "ray.serve._private.client:ServeControllerClient.get_serve_details":
        "what `_get_global_client()` returns and the one method called on it",
    # `serve.get_replica_context()` describes the replica, not the request; Serve has no public request getter.
    "ray.serve.context:_get_serve_request_context": "the id Serve's proxy gave the request being handled",
    "ray.serve.context:_RequestContext.request_id": "the field read from that context",
    # Autoscaler v2 keeps its node groups in the GCS; Ray reads them only through this state object (Ray Data's
    # own autoscaler does the same). No public API says what node types an autoscaler may add.
    "ray._private.state:state": "autoscaler v2 node groups (GlobalState.get_cluster_config)",
    "ray._private.state:GlobalState.get_cluster_config": "the method called on it",
    # A v1 autoscaler publishes its node types only in its status report in the GCS key-value store (where
    # `ray status` reads it); there is no public getter for that report.
    "ray.experimental.internal_kv:_internal_kv_get": "the v1 autoscaler's status report (node types)",
    # Ray Train logs every `ray.train.report` (the whole metrics dict, from every rank) at INFO through a logger
    # named by its file path, so it propagates to the root logger Ray Train sets to INFO in each worker: neither
    # the run's LoggingConfig nor the "ray.train" logger's level reaches it. Only that module's logger object can.
    "ray.train.v2._internal.execution.context:logger": "the logger of Ray Train's per-report INFO line",
    # Ray Data's console and file logging is configured by a YAML (RAY_DATA_LOGGING_CONFIG, a public switch) whose
    # handler classes must be importable by path. The file handler writes into the Ray session's log directory,
    # which no public API names; the filter honours Ray Data's `hide` record attribute.
    "ray.data._internal.logging:SessionFileHandler": "Ray Data's ray-data.log in the session directory",
    "ray.data._internal.logging:HiddenRecordFilter": "Ray Data's console filter for records it marks hidden",
    # `rayapp serve` runs a Serve config file exactly as `serve run` does (http_options, several applications,
    # blocking until Ctrl-C). The public `serve.run` takes one built application, not a config file; the `serve`
    # executable is not on PATH in every install (pip --user, an unactivated venv), so rayapp calls the function
    # behind it: the entry point Ray's own package metadata names for its `serve` console script.
    "ray.serve.scripts:cli": "Ray's `serve` command line (its console script), for `rayapp serve`",
}

# Names the Ray Data logging YAML (rayapp/runtime/ray_data_logging.yaml) uses for the classes above.
_LAZY_CLASSES = {
    "RayDataSessionFileHandler": "ray.data._internal.logging:SessionFileHandler",
    "RayDataHiddenRecordFilter": "ray.data._internal.logging:HiddenRecordFilter",
}


def private(path: str):
    """Resolve a PRIVATE_APIS entry ("module:attr.attr") to the object; ImportError/AttributeError if Ray moved it."""
    if path not in PRIVATE_APIS:
        raise KeyError(f"{path} is not listed in rayapp.ray_compat.PRIVATE_APIS")
    module_name, _, attributes = path.partition(":")
    obj = importlib.import_module(module_name)
    for name in attributes.split("."):
        obj = getattr(obj, name)
    return obj


def __getattr__(name: str):
    # Lets a logging config name `rayapp.ray_compat.RayData...` without this module importing Ray Data eagerly.
    if name in _LAZY_CLASSES:
        return private(_LAZY_CLASSES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quiet_train_report_log() -> None:
    """Ray Train's per-report INFO line off in this process (a train worker); warnings still pass."""
    private("ray.train.v2._internal.execution.context:logger").setLevel(logging.WARNING)


def serve_details() -> dict | None:
    """Serve's instance details (applications with their `deployed_app_config`), or None when no Serve runs."""
    client = private("ray.serve.context:_get_global_client")(raise_if_no_controller_running=False)
    return None if client is None else client.get_serve_details()


def serve_request_id() -> str:
    """The id of the Serve request being handled in this replica ('' outside one)."""
    return private("ray.serve.context:_get_serve_request_context")().request_id or ""


def autoscaler_node_groups() -> list[dict] | None:
    """Resources of each node group autoscaler v2 may add (groups capped at 0 left out); None without v2 config."""
    config = private("ray._private.state:state").get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]


def autoscaler_v1_node_types() -> list[str]:
    """Node types named in a v1 autoscaler's status report ([] without one)."""
    raw = private("ray.experimental.internal_kv:_internal_kv_get")("__autoscaling_status")
    status = json.loads(raw or b"{}")
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return [str(node_type) for node_type in mapping.values()]


def run_serve_cli(arguments: list[str]) -> None:
    """Run Ray's `serve` command line in this process with `arguments` (e.g. ["run", "config.yaml"])."""
    private("ray.serve.scripts:cli").main(args=arguments, prog_name="serve", standalone_mode=False)
