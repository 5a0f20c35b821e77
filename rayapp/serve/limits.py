"""Hard input limits of the HTTP API, configurable from the Serve YAML (`args.limits`)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MiB = 1024 * 1024


class ServeLimits(BaseModel):
    """Per-request ceilings; anything above is refused with a 4xx before it reaches the model."""

    # Unknown keys are a typo in the YAML, not something to ignore silently.
    model_config = ConfigDict(extra="forbid")

    max_images: int = Field(32, ge=1, description="images per request on /v1/score, /v1/score_pairs")
    max_batch_pairs: int = Field(256, ge=1, description="(prompt, image) pairs per request on /v1/score_batch")
    max_image_bytes: int = Field(8 * MiB, ge=1, description="encoded bytes per image, after base64 decoding")
    max_request_bytes: int = Field(64 * MiB, ge=1, description="bytes of the whole HTTP request body")
    max_pixels: int = Field(40_000_000, ge=1, description="width x height per image, checked before decoding")
    max_prompt_chars: int = Field(2000, ge=1, description="characters per prompt")

    def public(self) -> dict:
        """The limits as reported by GET /v1/models."""
        return self.model_dump()
