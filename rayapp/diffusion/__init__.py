"""Diffusers text-to-image helpers for ReFL and generation: pipeline loading (any AutoPipelineForText2Image
family), the family-as-data training parts (SD 1.x/2.x, SDXL, SD3 / SD3.5, FLUX.1), and the offline tiny
pipelines of each family.

Importing this package is light; diffusers is imported inside the functions.
"""
from __future__ import annotations

from .parts import (
    FAMILIES,
    Conditioning,
    DiffusionParts,
    PipelineFamily,
    family_and_resolution,
    family_of,
    load_diffusion_parts,
    parts_from_pipeline,
)
from .pipelines import (
    TINY_PIPELINES,
    load_pipeline,
    make_scheduler,
    pipeline_class_name,
    pipeline_resolution,
    tiny_pipeline,
    vae_scale_factor,
)
from .tiny import build_tiny_sd_pipeline, tiny_sd_pipeline
from .tiny_flux import build_tiny_flux_pipeline, tiny_flux_pipeline
from .tiny_sd3 import build_tiny_sd3_pipeline, tiny_sd3_pipeline
from .tiny_sdxl import build_tiny_sdxl_pipeline, tiny_sdxl_pipeline

__all__ = ["FAMILIES", "TINY_PIPELINES", "Conditioning", "DiffusionParts", "PipelineFamily",
           "build_tiny_flux_pipeline", "build_tiny_sd3_pipeline", "build_tiny_sd_pipeline", "build_tiny_sdxl_pipeline",
           "family_and_resolution", "family_of", "load_diffusion_parts", "load_pipeline", "make_scheduler",
           "parts_from_pipeline", "pipeline_class_name", "pipeline_resolution", "tiny_flux_pipeline", "tiny_pipeline",
           "tiny_sd3_pipeline", "tiny_sd_pipeline", "tiny_sdxl_pipeline", "vae_scale_factor"]
