"""Typed HTTP responses (they are the OpenAPI schema at /openapi.json) and the one error shape."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rayapp.serve.limits import ServeLimits


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    request_id: str = Field("", description="this request's id; the same as the X-Request-ID header and log lines")


class ErrorResponse(_Response):
    """Every 4xx/5xx body: what is wrong and which field (or image index) to fix."""

    detail: str = Field(description="human-readable reason, starting with the field it names")
    field: str | None = Field(None, description="the offending field: prompt, images[2], pairs[7].image, model, ...")


class ScoreResponse(_Response):
    """POST /v1/score."""

    model: str = Field(description="id of the model that scored")
    scores: list[float] = Field(description="one reward per image, in request order; higher is better")
    ranking: list[int] = Field(description="ranking[i] = rank of image i, 1 = best; ties keep request order")
    truncated_prompt: bool = Field(description="the prompt was longer than the model's token limit and was cut")
    batch_size: int = Field(description="images in the largest forward pass this request rode in")
    batch_requests: int = Field(description="requests merged into that forward pass")
    weights_sha256: str | None = Field(description="sha256 of the weights file that scored (GET /version)")


class PairsResponse(_Response):
    """POST /v1/score_pairs and /v1/score_batch."""

    model: str
    scores: list[float] = Field(description="scores[i] is images[i] under prompts[i], in request order")
    truncated_prompts: list[bool]
    batch_size: int
    batch_requests: int
    weights_sha256: str | None = Field(description="sha256 of the weights file that scored (GET /version)")


class ModelInfo(BaseModel):
    """One served model."""

    model_config = ConfigDict(protected_namespaces=())
    id: str
    scorer: str = Field(description="ImageReward, CLIP, BLIP or Aesthetic")
    default: bool = Field(description="used when a request names no model")
    image_size: int
    max_length: int | None = Field(description="prompt tokens the model reads; None when it ignores the prompt")
    uses_prompt: bool
    device: str
    dtype: str
    max_batch_size: int
    batch_wait_timeout_s: float
    weights_sha256: str | None = Field(description="sha256 of the weights file as stored; None for a baseline's "
                                                   "published multi-file weights")
    weights_file: str | None = Field(description="name of that file: model.safetensors, ImageReward.pt, ...")
    created: int = Field(description="Unix time of the weights file (its mtime)")


class OpenAIModel(BaseModel):
    """One entry of the OpenAI-style model list."""

    model_config = ConfigDict(protected_namespaces=())
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time of the weights file")
    owned_by: str = "rayapp"
    weights_sha256: str | None


class MultiplexInfo(BaseModel):
    """User checkpoints loaded on first use: `model` = a path relative to the checkpoint root."""

    max_models_per_replica: int
    max_batch_size: int
    batch_wait_timeout_s: float


class Batching(BaseModel):
    """The default model's batching (kept for clients written against one model)."""

    max_batch_size: int
    batch_wait_timeout_s: float


class ModelsResponse(_Response):
    """GET /v1/models: the models, the default first, with the request limits.

    `object` and `data` are the OpenAI list shape; the other fields carry rayapp's details.
    """

    object: Literal["list"] = "list"
    data: list[OpenAIModel]
    default: str
    models: list[ModelInfo]
    batching: Batching
    multiplex: MultiplexInfo | None
    limits: ServeLimits
    auth_required: bool


class ModelVersion(BaseModel):
    """A configured model's weights identity."""

    model_config = ConfigDict(protected_namespaces=())
    id: str
    weights_sha256: str | None = Field(description="sha256 of the weights file as stored")
    weights_file: str | None = Field(description="model.safetensors, ImageReward.pt, ...")


class VersionResponse(_Response):
    """GET /version: what is serving, for reproducible RL runs."""

    version: str = Field(description="the rayapp package version")
    api_version: str = Field(description="version of this HTTP API (the OpenAPI info.version)")
    models: list[ModelVersion]


class HealthResponse(BaseModel):
    """GET /healthz (never needs the token)."""

    model_config = ConfigDict(protected_namespaces=())
    status: str = Field(description="ok, or unavailable with a 503")
    model: str | None = Field(None, description="the default model")
    models: list[str] = Field(default_factory=list)
    detail: str | None = None


RETRY_AFTER_HEADER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text, **({"headers": RETRY_AFTER_HEADER} if status == 503 else {})}
    for status, text in {
        400: "malformed body (invalid JSON, bad multipart)",
        401: "missing or wrong bearer token (when the server requires one)",
        404: "unknown model",
        413: "too many images, or an image or the body larger than the limits",
        415: "unsupported Content-Type",
        422: "a field is missing or invalid, an image does not decode or has too many pixels",
        503: "overloaded (the model's queue is full) or no model replica right now; retry after Retry-After",
    }.items()
}
