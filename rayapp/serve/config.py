"""The Serve application's arguments (`args:` of serve_configs/*.yaml), validated before anything is deployed.

No Ray, FastAPI or torch here: the client, the builder and the tests all read these models.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayapp import scorers
from rayapp.serve.limits import ServeLimits

# Ids appear in URLs, JSON, metric tags and log lines: keep them plain.
MODEL_ID = re.compile(r"^[A-Za-z0-9/][A-Za-z0-9._+:/-]{0,255}$")
# A user checkpoint is a relative path under the checkpoint root: segments of plain characters, no '..'.
CHECKPOINT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._+-]{0,127}){0,7}$")
COMMON_OPTION_KEYS = ("config", "seed")  # rayapp.load_score's own; each scorer adds its registration's options
MIN_TOKEN_CHARS = 16


class ModelSpec(BaseModel):
    """One scorer served by the application, picked by requests with `"model": <id>`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str = Field(description="the name requests use and responses report")
    scorer: str = Field("ImageReward", description="a name of the scorer registry, any case: "
                                                   + scorers.describe_names())
    source: str | None = Field(
        None,
        description="ImageReward: hub name (ImageReward-v1.0), ImageReward.pt, save_pretrained dir, or a URI "
        "(hf://owner/repo[/dir], s3://, gs://, file://). Baselines: a save_pretrained dir or URI; "
        "None = the published weights (see rayapp.scorers).",
    )
    device: str | None = Field(None, description="overrides the application's device for this model")
    dtype: str | None = Field(None, description="overrides the application's dtype for this model")
    options: dict = Field(default_factory=dict, description="rayapp.load_score keywords: config (tiny), seed, and "
                                                            "the scorer's own (ImageReward: download_root; "
                                                            "baselines: download_root, weights, clip_model, "
                                                            "blip_preset)")

    @field_validator("id")
    @classmethod
    def _plain_id(cls, value: str) -> str:
        if not MODEL_ID.match(value):
            raise ValueError(f"model id {value!r} must match {MODEL_ID.pattern}")
        return value

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, value: str) -> str:
        return scorers.canonical_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        allowed = {*COMMON_OPTION_KEYS, *scorers.registration(self.scorer).options}
        unknown = set(self.options) - allowed
        if unknown:
            raise ValueError(f"model {self.id!r}: {self.scorer} takes no options {sorted(unknown)}; "
                             f"allowed: {sorted(allowed)}")
        return self


class MultiplexConfig(BaseModel):
    """User checkpoints loaded on first use (Serve model multiplexing), an LRU per model replica."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_root: str = Field(
        description="directory or URI prefix (s3://, gs://, hf://owner/repo, file://) that holds the checkpoints; "
        "a request's model id is a relative path below it"
    )
    max_models_per_replica: int = Field(2, ge=1, description="LRU size: checkpoints kept loaded per replica")


class AuthConfig(BaseModel):
    """A bearer token every /v1 request must carry; `/healthz`, `/`, `/docs` stay open."""

    model_config = ConfigDict(extra="forbid")

    token_env: str | None = Field(None, description="environment variable holding the token (on the replica)")
    token_file: str | None = Field(None, description="file holding the token, e.g. a mounted Kubernetes Secret")

    @model_validator(mode="after")
    def _one_source(self) -> AuthConfig:
        if bool(self.token_env) == bool(self.token_file):
            raise ValueError("auth: give exactly one of token_env or token_file")
        return self


class CorsConfig(BaseModel):
    """Browsers on these origins may call the API (Starlette's CORSMiddleware)."""

    model_config = ConfigDict(extra="forbid")

    allow_origins: list[str] = Field(description="exact origins, e.g. https://labeling.example.com; '*' for any")
    allow_credentials: bool = False
    max_age_s: int = Field(600, ge=0)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(f"CORS origin {origin!r} must be scheme://host[:port] with no path, or '*'")
        return value


class ResourceCheckConfig(BaseModel):
    """Refuse, at build time, deployments whose resource requests no node of the cluster can ever meet."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "fail", "warn", "off"] = Field(
        "auto", description="auto: fail, unless an autoscaler may still add nodes (then warn)"
    )
    wait_s: float = Field(0.0, ge=0, description="wait this long for nodes to join before judging")


class AppArgs(BaseModel):
    """`args:` of the Serve config; per-deployment resources and autoscaling live under `deployments:`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # One model (the original form of the config)...
    model: str = Field("ImageReward-v1.0", description="name from available_models(), .pt file, save_pretrained dir "
                                                       "or URI; ignored when `models` is given")
    name: str | None = Field(None, description="model id reported by the API; defaults to `model`")
    # ... or several behind one endpoint.
    models: list[ModelSpec] = Field(default_factory=list, description="the scorers served; requests pick one by id")
    default_model: str | None = Field(None, description="id used when a request names none; default: the first")
    multiplex: MultiplexConfig | None = Field(None, description="load user checkpoints on demand (off when absent)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ...; None = cuda when the replica has a GPU")
    dtype: str | None = Field(None, description="float32, bfloat16, float16; None = the loader's default")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads per model replica")
    # Batching per model lives in RewardScorer's user_config (`models: {id: {...}}`), changeable live.
    max_batch_size: int = Field(16, ge=1, description="images per forward pass (user_config overrides)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="wait for a batch to fill (user_config overrides)")
    decode_threads: int = Field(2, ge=1, le=64, description="threads per ingress replica decoding images")
    limits: ServeLimits = Field(default_factory=ServeLimits)
    auth: AuthConfig | None = Field(None, description="bearer token for /v1 routes (off when absent)")
    cors: CorsConfig | None = Field(None, description="CORS allow-list (no CORS headers when absent)")
    resource_check: ResourceCheckConfig = Field(default_factory=ResourceCheckConfig)
    # For programmatic use (tests, benchmarks); YAML users set these under `deployments:` instead.
    scorer_options: dict = Field(default_factory=dict, description="Serve options for RewardScorer")
    api_options: dict = Field(default_factory=dict, description="Serve options for RewardAPI")

    @model_validator(mode="after")
    def _models_consistent(self) -> AppArgs:
        if self.models and ({"model", "name"} & self.model_fields_set):
            raise ValueError("give either `model` (one model) or `models` (several), not both")
        ids = [spec.id for spec in self.model_specs()]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {duplicates}")
        if self.default_model is not None and self.default_model not in ids:
            raise ValueError(f"default_model {self.default_model!r} is not among the models {ids}")
        return self

    def model_specs(self) -> list[ModelSpec]:
        """The configured scorers, the default first."""
        specs = list(self.models) or [ModelSpec(id=_legacy_id(self.name or self.model), source=self.model)]
        default = self.default_model or specs[0].id
        return sorted(specs, key=lambda spec: spec.id != default)


def _legacy_id(name: str) -> str:
    """The one-model form used the checkpoint path as its id; keep that, made safe for the id pattern."""
    if MODEL_ID.match(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._+:/-]+", "-", name).strip("-.") or "model"
    return cleaned[-256:].lstrip("-.") or "model"
