"""The HTTP ingress deployment: parses and validates requests, decodes images, calls the model deployment."""
# No `from __future__ import annotations`: FastAPI must see real types on the serve.ingress methods.

import asyncio
import json
from importlib import resources

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.formparsers import MultiPartException, MultiPartParser

from rayapp.model.modeling import rank_from_scores
from rayapp.serve import inputs
from rayapp.serve.annotate import annotate_png
from rayapp.serve.inputs import InputError
from rayapp.serve.limits import ServeLimits

RETRYABLE = (RayActorError, BackPressureError, DeploymentUnavailableError)


def _body_doc(schema: type, files: dict) -> dict:
    """OpenAPI for a route that takes JSON (base64 images) or multipart uploads."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": files}},
    }}}


_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_TEXT = {"type": "string"}

app = FastAPI(
    title="ImageReward on Ray Serve",
    description="Human-preference reward scores for text-to-image generations. Images are sent inline "
    "(base64 JSON or multipart); the server never fetches URLs.",
    version="1.0",
)


@app.exception_handler(InputError)
async def _input_error(_: Request, err: InputError) -> JSONResponse:
    return JSONResponse({"detail": err.message, "field": err.field}, status_code=err.status)


async def _once(body: bytes):
    """The already size-checked body as the stream Starlette's multipart parser reads."""
    yield body
    yield b""


@serve.deployment(
    name="RewardAPI",
    # The ingress mostly waits on the model deployment; let many requests in so batches can fill.
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(app)
class RewardAPI:
    """FastAPI ingress; one bad image is refused here and never joins a batch."""

    def __init__(self, scorer: DeploymentHandle, limits: dict | None = None):
        self.scorer = scorer
        self.limits = ServeLimits.model_validate(limits or {})
        self._info: dict | None = None

    async def _model_info(self) -> dict:
        if self._info is None:
            self._info = await self._call(self.scorer.info)
        return self._info

    async def _call(self, method, *args):
        """Call the model deployment, retrying while a dead replica is being replaced (scoring is idempotent)."""
        for attempt in range(4):
            try:
                return await method.remote(*args)
            except RETRYABLE:
                if attempt == 3:
                    break
                await asyncio.sleep(0.5 * (attempt + 1))
        raise HTTPException(503, "no model replica available; retry shortly")

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed max_request_bytes."""
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise InputError(413, "body", f"{declared} bytes; the limit is {limit} per request")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InputError(413, "body", f"more than {limit} bytes; the limit is {limit} per request")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request, kind: type) -> tuple[str, object]:
        """('json', validated model) or ('form', FormData), by Content-Type."""
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
                request.headers, _once(body), max_files=4 * self.limits.max_images + 4,
                max_fields=4 * self.limits.max_images + 8, max_part_size=4 * self.limits.max_prompt_chars + 1024,
            )
            try:
                return "form", await parser.parse()
            except MultiPartException as err:
                raise InputError(400, "body", f"bad multipart body: {err.message}") from None
        raise InputError(415, "content-type", "send application/json or multipart/form-data")

    async def _form_images(self, form, key: str) -> list[tuple[str, bytes]]:
        items = form.getlist(key)
        inputs.check_count(len(items), key, self.limits)
        out = []
        for i, item in enumerate(items):
            field = f"{key}[{i}]"
            if isinstance(item, str):
                raise InputError(422, field, "must be an uploaded file, not a text field")
            out.append((field, await item.read()))
        return out

    def _json_images(self, values: list[str], key: str) -> list[tuple[str, bytes]]:
        inputs.check_count(len(values), key, self.limits)
        return [(f"{key}[{i}]", inputs.decode_base64(v, f"{key}[{i}]", self.limits)) for i, v in enumerate(values)]

    def _form_text(self, form, key: str) -> str:
        value = form.get(key)
        if value is None:
            raise InputError(422, key, "field required")
        if not isinstance(value, str):
            raise InputError(422, key, "must be a text field, not a file")
        return value

    def _decode(self, raws: list[tuple[str, bytes]]) -> list:
        total = sum(len(raw) for _, raw in raws)
        if total > self.limits.max_request_bytes:
            raise InputError(413, "images", f"{total} bytes in all; the limit is {self.limits.max_request_bytes}")
        return [inputs.open_image(raw, field, self.limits) for field, raw in raws]

    async def _score(self, images: list, prompts: list[str]) -> dict:
        info = await self._model_info()
        pixels: np.ndarray = await asyncio.to_thread(inputs.to_pixels, images, info["image_size"])
        return await self._call(self.scorer.score, pixels, prompts)

    @app.post("/v1/score", openapi_extra=_body_doc(inputs.ScoreRequest, {"prompt": _TEXT, "images": _FILES}))
    async def score(self, request: Request) -> dict:
        """Score several images against one prompt; higher is better."""
        how, parsed = await self._parse(request, inputs.ScoreRequest)
        if how == "json":
            prompt, raws = parsed.prompt, self._json_images(parsed.images, "images")
        else:
            prompt, raws = self._form_text(parsed, "prompt"), await self._form_images(parsed, "images")
        prompt = inputs.check_prompt(prompt, "prompt", self.limits)
        images = await asyncio.to_thread(self._decode, raws)
        result = await self._score(images, [prompt] * len(images))
        return {
            "model": (await self._model_info())["id"],
            "scores": result["scores"],
            "ranking": rank_from_scores(result["scores"]),
            "truncated_prompt": result["truncated"][0],
            "batch_size": result["batch_size"],
            "batch_requests": result["batch_requests"],
        }

    @app.post("/v1/score_pairs",
              openapi_extra=_body_doc(inputs.ScorePairsRequest, {"prompts": {"type": "array", "items": _TEXT},
                                                                  "images": _FILES}))
    async def score_pairs(self, request: Request) -> dict:
        """Score images[i] against prompts[i]."""
        how, parsed = await self._parse(request, inputs.ScorePairsRequest)
        if how == "json":
            prompts, raws = parsed.prompts, self._json_images(parsed.images, "images")
        else:
            prompts, raws = [p for p in parsed.getlist("prompts")], await self._form_images(parsed, "images")
        if len(prompts) != len(raws):
            raise InputError(422, "prompts", f"{len(prompts)} prompts for {len(raws)} images; they pair one to one")
        prompts = [inputs.check_prompt(p, f"prompts[{i}]", self.limits) for i, p in enumerate(prompts)]
        images = await asyncio.to_thread(self._decode, raws)
        result = await self._score(images, prompts)
        return {
            "model": (await self._model_info())["id"],
            "scores": result["scores"],
            "truncated_prompts": result["truncated"],
            "batch_size": result["batch_size"],
            "batch_requests": result["batch_requests"],
        }

    @app.post("/v1/annotate", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the PNG with its score in text chunks"}},
              openapi_extra=_body_doc(inputs.AnnotateRequest, {"prompt": _TEXT, "image": {"type": "string",
                                                                                         "format": "binary"}}))
    async def annotate(self, request: Request) -> Response:
        """Return the image as PNG with 'ImageReward Score: x.xxxx' in its text chunks (PNG info)."""
        how, parsed = await self._parse(request, inputs.AnnotateRequest)
        if how == "json":
            prompt, raws = parsed.prompt, self._json_images([parsed.image], "image")
        else:
            prompt, raws = self._form_text(parsed, "prompt"), await self._form_images(parsed, "image")
        if len(raws) != 1:
            raise InputError(422, "image", "exactly one image is annotated per request")
        raws = [("image", raws[0][1])]
        prompt = inputs.check_prompt(prompt, "prompt", self.limits)
        images = await asyncio.to_thread(self._decode, raws)
        score = (await self._score(images, [prompt]))["scores"][0]
        png = await asyncio.to_thread(annotate_png, images[0], score)
        return Response(png, media_type="image/png", headers={"X-ImageReward-Score": repr(score)})

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when a model replica answers."""
        try:
            info = await asyncio.wait_for(self.scorer.info.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 -- any failure means not healthy
            return JSONResponse({"status": "unavailable", "detail": str(err)[:200]}, status_code=503)
        return JSONResponse({"status": "ok", "model": info["id"]})

    @app.get("/v1/models")
    async def models(self) -> dict:
        """The served model, its input sizes, batching settings and the request limits."""
        info = await self._call(self.scorer.info)
        self._info = info
        return {
            "models": [{k: info[k] for k in ("id", "image_size", "max_length", "device", "dtype")}],
            "batching": {k: info[k] for k in ("max_batch_size", "batch_wait_timeout_s")},
            "limits": self.limits.public(),
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The scoring web page."""
        return HTMLResponse(resources.files("rayapp.serve").joinpath("static/index.html").read_text())
