"""ASGI middleware in front of the API routes: request id, CORS allow-list and bearer-token check.

The settings come from the application's args, which the ingress replica only knows in `__init__`, so the
middleware (added when the FastAPI app is defined) reads them from this module's `SETTINGS`.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from rayapp.serve.config import MIN_TOKEN_CHARS, AuthConfig, CorsConfig
from rayapp.serve.replica_logs import safe_request_id

logger = logging.getLogger(__name__)

REQUEST_ID: ContextVar[str] = ContextVar("rayapp_request_id", default="")
OPEN_PATHS = ("/healthz", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")


def load_token(auth: AuthConfig) -> bytes:
    """The bearer token named by the config, or an error naming where it was looked for."""
    if auth.token_file:
        path = Path(auth.token_file).expanduser()
        if not path.is_file():
            raise ValueError(f"auth.token_file {auth.token_file!r} does not exist on this node")
        token, where = path.read_text().strip(), f"file {auth.token_file}"
    else:
        token, where = os.environ.get(auth.token_env or "", "").strip(), f"environment variable {auth.token_env}"
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"auth: the {where} must hold a token of at least {MIN_TOKEN_CHARS} characters "
                         f"(it holds {len(token)}); "
                         "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token.encode()


@dataclass
class GatewaySettings:
    """What the middleware enforces; set once per ingress replica."""

    token: bytes | None = None
    cors: CorsConfig | None = None
    on_reject: Callable[[str, str], None] | None = field(default=None, repr=False)


SETTINGS = GatewaySettings()


def configure(auth: AuthConfig | None, cors: CorsConfig | None, on_reject: Callable[[str, str], None]) -> None:
    """Install this replica's settings (called from the ingress constructor; raises if the token is missing)."""
    SETTINGS.token = load_token(auth) if auth is not None else None
    SETTINGS.cors = cors
    SETTINGS.on_reject = on_reject


def route_path(scope: dict) -> str:
    """The path below the application's route prefix (Serve passes the prefix as root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def _bearer(scope: dict) -> bytes:
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            return credentials.strip() if scheme.lower() == b"bearer" else b""
    return b""


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


class GatewayMiddleware:
    """Request id for every response body and log line; CORS; 401 for /v1 routes without the right token."""

    def __init__(self, app):
        self.app = app
        self._cors_for: CorsConfig | None = None
        self._cors_app = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Serve's proxy puts the client's X-Request-ID (or a generated one) in the headers and echoes it back.
        request_id = safe_request_id(_header(scope, b"x-request-id")) or uuid.uuid4().hex
        reset = REQUEST_ID.set(request_id)
        try:
            await self._cors(scope, receive, send)
        finally:
            REQUEST_ID.reset(reset)

    async def _cors(self, scope, receive, send) -> None:
        cors = SETTINGS.cors
        if cors is None:
            await self._authorize(scope, receive, send)
            return
        if self._cors_for is not cors:
            from starlette.middleware.cors import CORSMiddleware

            self._cors_app = CORSMiddleware(
                self._authorize, allow_origins=cors.allow_origins, allow_credentials=cors.allow_credentials,
                allow_methods=["GET", "POST", "OPTIONS"], max_age=cors.max_age_s,
                allow_headers=["authorization", "content-type", "x-request-id"],
                expose_headers=["x-request-id", "x-imagereward-score"],
            )
            self._cors_for = cors
        await self._cors_app(scope, receive, send)

    async def _authorize(self, scope, receive, send) -> None:
        token = SETTINGS.token
        path = route_path(scope)
        if token is None or path in OPEN_PATHS or not path.startswith("/v1"):
            await self.app(scope, receive, send)
            return
        given = _bearer(scope)
        # compare_digest takes the same time wherever the first difference is.
        if given and hmac.compare_digest(given, token):
            await self.app(scope, receive, send)
            return
        detail = "authorization: send the header 'Authorization: Bearer <token>'" if not given else \
            "authorization: wrong bearer token"
        if SETTINGS.on_reject is not None:
            SETTINGS.on_reject("auth", path)
        logger.info("refused %s %s: %s", scope.get("method"), path, "no token" if not given else "wrong token")
        body = json.dumps({"detail": detail, "field": "authorization", "request_id": REQUEST_ID.get()}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="rayapp"'),
        ]})
        await send({"type": "http.response.body", "body": body})
