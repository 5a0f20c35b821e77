"""Our loggers inside a Serve replica write through Serve's handlers, so each line carries the request id."""
from __future__ import annotations

import logging
import re

from rayapp import ray_compat

_ATTACHED = "_rayapp_serve_handlers"
_SAFE_ID = re.compile(r"[^A-Za-z0-9._:-]")


def attach_to_serve_logs(level: int = logging.INFO) -> None:
    """Send `rayapp.*` records to the replica's Serve log (its filter adds the request id and route)."""
    ours = logging.getLogger("rayapp")
    if getattr(ours, _ATTACHED, False):
        return
    serve_logger = logging.getLogger("ray.serve")
    for handler in serve_logger.handlers:
        ours.addHandler(handler)
    if serve_logger.handlers:
        ours.propagate = False  # the same line once, not again through the root logger
    ours.setLevel(level)
    setattr(ours, _ATTACHED, True)


def current_request_id() -> str:
    """The id Serve's proxy gave this request (the client's X-Request-ID, or a generated one); '' outside one."""
    try:
        return safe_request_id(ray_compat.serve_request_id())
    except Exception:  # noqa: BLE001 -- outside Serve there is no request context
        return ""


def safe_request_id(value: str | None) -> str:
    """A client-chosen id made safe for log lines and JSON (no newlines or control characters; 128 max)."""
    return _SAFE_ID.sub("_", value or "")[:128]
