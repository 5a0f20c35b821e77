"""The HTTP ingress deployment: parses and validates requests, decodes images, calls the model deployment."""
# No `from __future__ import annotations`: FastAPI must see real types on the serve.ingress methods.

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.formparsers import MultiPartException, MultiPartParser

import rayapp
from rayapp.model.images import crop_uint8
from rayapp.model.scoring import rank_from_scores
from rayapp.serve import gateway, inputs, wire
from rayapp.serve.annotate import annotate_png
from rayapp.serve.config import CHECKPOINT_ID, AuthConfig, CorsConfig
from rayapp.serve.gateway import GatewayMiddleware
from rayapp.serve.inputs import InputError
from rayapp.serve.limits import ServeLimits
from rayapp.serve.metrics import get_metrics
from rayapp.serve.models import ModelLoadError, ModelNotFoundError
from rayapp.serve.replica_logs import attach_to_serve_logs
from rayapp.serve.schemas import (
    ERROR_RESPONSES,
    HealthResponse,
    ModelsResponse,
    PairsResponse,
    ScoreResponse,
    VersionResponse,
)

logger = logging.getLogger(__name__)

# A replica being replaced or not yet up: retried briefly in the ingress, then 503 + Retry-After.
REPLICA_GONE = (RayActorError, DeploymentUnavailableError)
RETRY_AFTER_S = 1  # Retry-After of 503s when the deployment's backpressure_config names none
USER_INFO_CACHE = 256  # image sizes of user checkpoints remembered by the ingress
# A 2x2 PNG, valid as it stands: the request examples of the OpenAPI can be sent from /docs.
EXAMPLE_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJR"
               "U5ErkJggg==")
EXAMPLES = {
    inputs.ScoreRequest: {"prompt": "a red car on a country road", "images": [EXAMPLE_PNG, EXAMPLE_PNG]},
    inputs.ScorePairsRequest: {"prompts": ["a red car", "a cat on a sofa"], "images": [EXAMPLE_PNG, EXAMPLE_PNG]},
    inputs.AnnotateRequest: {"prompt": "a red car", "image": EXAMPLE_PNG},
}


def _body_doc(schema: type, files: dict, binary: bool = False) -> dict:
    """OpenAPI for a route that takes JSON (base64 images), multipart uploads, or the binary pairs body."""
    content = {
        "application/json": {"schema": schema.model_json_schema(), "example": EXAMPLES[schema]},
        "multipart/form-data": {"schema": {"type": "object", "properties": {**files, "model": _TEXT}}},
    }
    if binary:
        content[wire.CONTENT_TYPE] = {"schema": {"type": "string", "format": "binary",
                                                 "description": wire.__doc__.split("\n\n", 1)[1]}}
    return {"requestBody": {"required": True, "content": content},
            "parameters": [{"name": "model", "in": "query", "required": False, "schema": _TEXT,
                            "description": "model id (GET /v1/models); or the body's `model` field"}]}


_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_TEXT = {"type": "string"}

app = FastAPI(
    title="ImageReward on Ray Serve",
    description="Human-preference reward scores for text-to-image generations. Images are sent inline "
    "(base64 JSON, multipart, or the length-prefixed binary body of /v1/score_batch); the server never fetches "
    "URLs. Every error body is `{detail, field, request_id}`. When the server has a token, /v1 routes need "
    "`Authorization: Bearer <token>`. An overloaded server answers 503 with `Retry-After` (seconds) at once. Score "
    "responses name the sha256 of the weights that scored (`weights_sha256`, also in GET /version).",
    version="1.2",
)
app.add_middleware(GatewayMiddleware)


def _openapi() -> dict:
    """FastAPI's schema plus the bearer token that /v1 routes need when the server has one."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": "the server's token (args.auth); required on /v1 routes when the server has one"}}
        for path, operations in schema["paths"].items():
            if path.startswith("/v1"):
                for operation in operations.values():
                    operation["security"] = [{"bearerAuth": []}]
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


def _error(status: int, detail: str, field: str | None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "field": field, "request_id": gateway.REQUEST_ID.get()}, status_code=status,
                        headers=headers)


def unavailable(detail: str, retry_after_s: float | None = None) -> HTTPException:
    """A 503 that tells the client when to come back (Retry-After, whole seconds)."""
    seconds = RETRY_AFTER_S if retry_after_s is None else max(1, math.ceil(retry_after_s))
    return HTTPException(503, detail, headers={"Retry-After": str(seconds)})


@app.exception_handler(InputError)
async def _input_error(request: Request, err: InputError) -> JSONResponse:
    get_metrics().reject(err.reason, gateway.route_path(request.scope))
    logger.info("refused %s: %s (%s)", gateway.route_path(request.scope), err.message, err.reason)
    return _error(err.status, err.message, err.field)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    if err.status_code == 503:
        get_metrics().reject("overload", gateway.route_path(request.scope))
    return _error(err.status_code, str(err.detail), None, err.headers)


@app.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    logger.exception("internal error on %s", gateway.route_path(request.scope))
    return _error(500, f"internal error ({type(err).__name__}); quote the request id when reporting it", None)


async def _once(body: bytes):
    """The already size-checked body as the stream Starlette's multipart parser reads."""
    yield body
    yield b""


def _cause_message(err: Exception) -> str:
    """The message of the exception the model replica raised (Ray wraps it with a traceback)."""
    cause = getattr(err, "cause", None) or err
    return str(cause.args[0]) if cause.args else str(cause)


def _wire_error(err: wire.WireFormatError) -> InputError:
    return InputError(err.status, err.field, err.message, err.reason)


@serve.deployment(
    name="RewardAPI",
    # The ingress mostly waits on the model deployment; let many requests in so batches can fill.
    max_ongoing_requests=256,
    # Fractional: on a 2-CPU machine the ingress (0.5) and one model replica (1) fit with room to spare.
    ray_actor_options={"num_cpus": 0.5},
)
@serve.ingress(app)
class RewardAPI:
    """FastAPI ingress; one bad image is refused here and never joins a batch."""

    def __init__(self, scorer: DeploymentHandle, limits: dict | None = None, auth: dict | None = None,
                 cors: dict | None = None, decode_threads: int = 2):
        attach_to_serve_logs()
        self.scorer = scorer
        self.limits = ServeLimits.model_validate(limits or {})
        self.metrics = get_metrics()
        gateway.configure(AuthConfig.model_validate(auth) if auth else None,
                          CorsConfig.model_validate(cors) if cors else None, self.metrics.reject)
        self.auth_required = auth is not None
        self._pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self._info: dict | None = None
        self._user_info: OrderedDict[str, dict] = OrderedDict()

    # ---- the model deployment ------------------------------------------------------------------
    async def _model_info(self, refresh: bool = False) -> dict:
        """The model deployment's info; when it is overloaded or briefly gone, the last answer (if any)."""
        if self._info is None or refresh:
            try:
                self._info = await self._call(self.scorer.info)
            except HTTPException:
                if self._info is None:
                    raise
        return self._info

    async def _call(self, method, *args):
        """Call the model deployment, retrying while a dead replica is being replaced (scoring is idempotent).

        A full queue (the deployment's max_queued_requests) is answered at once with 503 + Retry-After: the
        client, not this replica, waits.
        """
        for attempt in range(4):
            try:
                return await method.remote(*args)
            except BackPressureError as err:
                raise unavailable("the model's request queue is full; retry after the Retry-After seconds",
                                  getattr(err, "retry_after_s", None)) from None
            except REPLICA_GONE:
                if attempt == 3:
                    break
                await asyncio.sleep(0.5 * (attempt + 1))
            except ModelNotFoundError as err:
                raise InputError(404, "model", _cause_message(err), "model") from None
            except ModelLoadError as err:
                raise InputError(422, "model", _cause_message(err), "model") from None
        raise unavailable("no model replica available; retry after the Retry-After seconds")

    async def _resolve(self, requested: str | None) -> tuple[str | None, dict, DeploymentHandle]:
        """(model id to send, its info, the handle to call): configured models, or a multiplexed checkpoint."""
        info = await self._model_info()
        if requested is None:
            return None, info["models"][0], self.scorer
        for model in info["models"]:
            if model["id"] == requested:
                return requested, model, self.scorer
        if info["multiplex"] is None:
            served = [m["id"] for m in info["models"]]
            raise InputError(404, "model", f"{requested!r} is not served; served: {served}", "model")
        if not CHECKPOINT_ID.match(requested) or ".." in requested.split("/"):
            raise InputError(404, "model", f"{requested!r} is neither a served model nor a checkpoint id "
                                           "(a relative path of [A-Za-z0-9._+-] parts)", "model")
        # Routed to a replica that holds (or will load) this checkpoint, like the scoring call after it.
        handle = self.scorer.options(multiplexed_model_id=requested)
        if requested not in self._user_info:
            self._user_info[requested] = await self._call(handle.model_info, requested)
            while len(self._user_info) > USER_INFO_CACHE:
                self._user_info.popitem(last=False)
        return requested, self._user_info[requested], handle

    # ---- request bodies --------------------------------------------------------------------------
    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed max_request_bytes."""
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise InputError(413, "body", f"{declared} bytes; the limit is {limit} per request", "size")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InputError(413, "body", f"more than {limit} bytes; the limit is {limit} per request", "size")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request, kind: type, max_items: int, binary: bool = False) -> tuple[str, object]:
        """('json', validated model), ('form', FormData) or ('wire', pairs), by Content-Type."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await self._read_body(request)
        if ctype == "application/json":
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(400, "body", f"not valid JSON: {err}") from None
            return "json", inputs.parse_model(kind, data)
        if ctype == "multipart/form-data":
            parser = MultiPartParser(
                request.headers, _once(body), max_files=max_items + 4, max_fields=2 * max_items + 8,
                max_part_size=4 * self.limits.max_prompt_chars + 1024,
            )
            try:
                return "form", await parser.parse()
            except MultiPartException as err:
                raise InputError(400, "body", f"bad multipart body: {err.message}") from None
        if binary and ctype == wire.CONTENT_TYPE:
            try:
                return "wire", wire.decode_pairs(body, max_pairs=max_items,
                                                 max_prompt_bytes=4 * self.limits.max_prompt_chars,
                                                 max_image_bytes=self.limits.max_image_bytes)
            except wire.WireFormatError as err:
                raise _wire_error(err) from None
        kinds = "application/json or multipart/form-data" + (f" or {wire.CONTENT_TYPE}" if binary else "")
        raise InputError(415, "content-type", f"send {kinds}")

    async def _form_images(self, form, key: str, most: int) -> list[tuple[str, bytes]]:
        items = form.getlist(key)
        inputs.check_count(len(items), key, self.limits, most)
        out = []
        for i, item in enumerate(items):
            field = f"{key}[{i}]"
            if isinstance(item, str):
                raise InputError(422, field, "must be an uploaded file, not a text field")
            out.append((field, await item.read()))
        return out

    def _json_images(self, values: list[str], key: str, most: int) -> list[tuple[str, bytes]]:
        inputs.check_count(len(values), key, self.limits, most)
        return [(f"{key}[{i}]", inputs.decode_base64(v, f"{key}[{i}]", self.limits)) for i, v in enumerate(values)]

    @staticmethod
    def _form_text(form, key: str, required: bool = True) -> str | None:
        value = form.get(key)
        if value is None:
            if required:
                raise InputError(422, key, "field required")
            return None
        if not isinstance(value, str):
            raise InputError(422, key, "must be a text field, not a file")
        return value

    @staticmethod
    def _model_name(request: Request, from_body: str | None) -> str | None:
        """The requested model: the body's `model` field or the `?model=` query parameter (they must agree)."""
        query = request.query_params.get("model")
        if query is not None and from_body is not None and query != from_body:
            raise InputError(422, "model", f"the query says {query!r} but the body says {from_body!r}", "model")
        name = from_body if from_body is not None else query
        if name is not None and not name.strip():
            raise InputError(422, "model", "must not be empty; omit it for the default model", "model")
        return name

    # ---- decoding and scoring ----------------------------------------------------------------------
    def _decode_one(self, field: str, raw: bytes, image_size: int) -> np.ndarray:
        return crop_uint8(inputs.open_image(raw, field, self.limits), image_size)

    async def _pixels(self, raws: list[tuple[str, bytes]], image_size: int) -> np.ndarray:
        """uint8 [N,S,S,3] for the model, decoded on the ingress's thread pool; the first bad image is reported."""
        total = sum(len(raw) for _, raw in raws)
        if total > self.limits.max_request_bytes:
            raise InputError(413, "images", f"{total} bytes in all; the limit is {self.limits.max_request_bytes}",
                             "size")
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*[
            loop.run_in_executor(self._pool, self._decode_one, field, raw, image_size) for field, raw in raws
        ], return_exceptions=True)
        for result in results:  # request order, so images[1] is named before images[2]
            if isinstance(result, BaseException):
                raise result
        return np.stack(results)

    async def _score(self, route: str, started: float, requested: str | None, raws: list[tuple[str, bytes]],
                     prompts: list[str]) -> dict:
        model_id, info, handle = await self._resolve(requested)
        pixels = await self._pixels(raws, info["image_size"])
        self.metrics.preprocessed(route, time.perf_counter() - started)
        return await self._call(handle.score, pixels, prompts, model_id)

    def _pairs(self, prompts: list, raws: list, field: str = "prompts[{}]") -> list[str]:
        if len(prompts) != len(raws):
            raise InputError(422, "prompts", f"{len(prompts)} prompts for {len(raws)} images; they pair one to one",
                             "count")
        return [inputs.check_prompt(p, field.format(i), self.limits) for i, p in enumerate(prompts)]

    # ---- routes --------------------------------------------------------------------------------------
    @app.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
              openapi_extra=_body_doc(inputs.ScoreRequest, {"prompt": _TEXT, "images": _FILES}))
    async def score(self, request: Request) -> dict:
        """Score several images against one prompt; higher is better."""
        started = time.perf_counter()
        most = self.limits.max_images
        how, parsed = await self._parse(request, inputs.ScoreRequest, most)
        if how == "json":
            prompt, raws, model = parsed.prompt, self._json_images(parsed.images, "images", most), parsed.model
        else:
            prompt, raws = self._form_text(parsed, "prompt"), await self._form_images(parsed, "images", most)
            model = self._form_text(parsed, "model", required=False)
        prompt = inputs.check_prompt(prompt, "prompt", self.limits)
        result = await self._score("/v1/score", started, self._model_name(request, model), raws,
                                   [prompt] * len(raws))
        return {
            "model": result["model"], "scores": result["scores"], "ranking": rank_from_scores(result["scores"]),
            "truncated_prompt": result["truncated"][0], "batch_size": result["batch_size"],
            "batch_requests": result["batch_requests"], "weights_sha256": result["weights_sha256"],
            "request_id": gateway.REQUEST_ID.get(),
        }

    async def _pairs_route(self, request: Request, route: str, most: int, binary: bool) -> dict:
        started = time.perf_counter()
        how, parsed = await self._parse(request, inputs.ScorePairsRequest, most, binary=binary)
        model, field = None, "prompts[{}]"
        if how == "json":
            prompts, raws, model = parsed.prompts, self._json_images(parsed.images, "images", most), parsed.model
        elif how == "form":
            prompts, raws = list(parsed.getlist("prompts")), await self._form_images(parsed, "images", most)
            model = self._form_text(parsed, "model", required=False)
        else:
            prompts = [prompt for prompt, _ in parsed]
            raws = [(f"pairs[{i}].image", image) for i, (_, image) in enumerate(parsed)]
            field = "pairs[{}].prompt"
        prompts = self._pairs(prompts, raws, field)
        result = await self._score(route, started, self._model_name(request, model), raws, prompts)
        return {
            "model": result["model"], "scores": result["scores"], "truncated_prompts": result["truncated"],
            "batch_size": result["batch_size"], "batch_requests": result["batch_requests"],
            "weights_sha256": result["weights_sha256"], "request_id": gateway.REQUEST_ID.get(),
        }

    @app.post("/v1/score_pairs", response_model=PairsResponse, responses=ERROR_RESPONSES,
              openapi_extra=_body_doc(inputs.ScorePairsRequest, {"prompts": {"type": "array", "items": _TEXT},
                                                                  "images": _FILES}))
    async def score_pairs(self, request: Request) -> dict:
        """Score images[i] against prompts[i] (up to max_images pairs)."""
        return await self._pairs_route(request, "/v1/score_pairs", self.limits.max_images, binary=False)

    @app.post("/v1/score_batch", response_model=PairsResponse, responses=ERROR_RESPONSES,
              openapi_extra=_body_doc(inputs.ScorePairsRequest, {"prompts": {"type": "array", "items": _TEXT},
                                                                  "images": _FILES}, binary=True))
    async def score_batch(self, request: Request) -> dict:
        """The RL-trainer route: up to max_batch_pairs (prompt, image) pairs, raw image bytes, order kept.

        Bodies: the length-prefixed binary format (application/x-rayapp-pairs, see docs/RL_REWARD_SERVER.md),
        multipart (repeated `prompts` text parts and `images` file parts, paired by position), or JSON with
        base64 images.
        """
        return await self._pairs_route(request, "/v1/score_batch", self.limits.max_batch_pairs, binary=True)

    @app.post("/v1/annotate", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the PNG with its score in text chunks"},
                         **ERROR_RESPONSES},
              openapi_extra=_body_doc(inputs.AnnotateRequest, {"prompt": _TEXT, "image": {"type": "string",
                                                                                         "format": "binary"}}))
    async def annotate(self, request: Request) -> Response:
        """Return the image as PNG with 'ImageReward Score: x.xxxx' in its text chunks (PNG info)."""
        started = time.perf_counter()
        how, parsed = await self._parse(request, inputs.AnnotateRequest, 1)
        if how == "json":
            prompt, raws, model = parsed.prompt, self._json_images([parsed.image], "image", 1), parsed.model
        else:
            prompt, raws = self._form_text(parsed, "prompt"), await self._form_images(parsed, "image", 1)
            model = self._form_text(parsed, "model", required=False)
        prompt = inputs.check_prompt(prompt, "prompt", self.limits)
        model_id, info, handle = await self._resolve(self._model_name(request, model))
        image = await asyncio.get_running_loop().run_in_executor(
            self._pool, inputs.open_image, raws[0][1], "image", self.limits)
        pixels = crop_uint8(image, info["image_size"])[None]
        self.metrics.preprocessed("/v1/annotate", time.perf_counter() - started)
        result = await self._call(handle.score, pixels, [prompt], model_id)
        score = result["scores"][0]
        png = await asyncio.to_thread(annotate_png, image, score)
        headers = {"X-ImageReward-Score": repr(score), "X-Model": result["model"]}
        if result["weights_sha256"]:
            headers["X-Weights-SHA256"] = result["weights_sha256"]
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def healthz(self) -> JSONResponse:
        """200 when a model replica answers (never needs the token)."""
        try:
            info = await asyncio.wait_for(self.scorer.info.remote(), timeout=10)
        except BackPressureError:
            if self._info is None:
                return JSONResponse({"status": "unavailable", "detail": "the model's request queue is full"},
                                    status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
            # Replicas that fill their queue are alive: busy is healthy.
            info = self._info
        except Exception as err:  # noqa: BLE001 -- any failure means not healthy
            return JSONResponse({"status": "unavailable", "detail": str(err)[:200]}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok", "model": info["default"], "models": [m["id"] for m in info["models"]]})

    @app.get("/v1/models", response_model=ModelsResponse, responses=ERROR_RESPONSES)
    async def models(self) -> dict:
        """The served models (default first), their input sizes and batching, user checkpoints, request limits.

        `object` and `data` are the OpenAI list shape (`GET /v1/models` of OpenAI-compatible servers).
        """
        info = await self._model_info(refresh=True)
        models = [{**m, "default": m["id"] == info["default"]} for m in info["models"]]
        default = models[0]
        return {
            "object": "list",
            "data": [{"id": m["id"], "object": "model", "created": m["created"], "owned_by": "rayapp",
                      "weights_sha256": m["weights_sha256"]} for m in models],
            "default": info["default"], "models": models,
            "batching": {k: default[k] for k in ("max_batch_size", "batch_wait_timeout_s")},
            "multiplex": info["multiplex"] and {k: info["multiplex"][k] for k in
                                                ("max_models_per_replica", "max_batch_size", "batch_wait_timeout_s")},
            "limits": self.limits.public(), "auth_required": self.auth_required, "request_id": gateway.REQUEST_ID.get(),
        }

    @app.get("/version", response_model=VersionResponse, responses=ERROR_RESPONSES)
    async def version(self) -> dict:
        """The rayapp version serving, and each configured model's weights digest (sha256 of the file as stored)."""
        info = await self._model_info(refresh=True)
        return {"version": rayapp.__version__, "api_version": app.version,
                "models": [{k: m[k] for k in ("id", "weights_sha256", "weights_file")} for m in info["models"]],
                "request_id": gateway.REQUEST_ID.get()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The scoring web page."""
        return HTMLResponse(resources.files("rayapp.serve").joinpath("static/index.html").read_text())
