"""Stable Diffusion helpers for ReFL and generation: a pipeline loader and the offline tiny pipeline.

Importing this package is light; diffusers is imported inside the functions.
"""
from __future__ import annotations

from .pipelines import load_pipeline, make_scheduler, pipeline_resolution, vae_scale_factor
from .tiny import build_tiny_sd_pipeline, tiny_sd_pipeline

__all__ = ["build_tiny_sd_pipeline", "load_pipeline", "make_scheduler", "pipeline_resolution", "tiny_sd_pipeline",
           "vae_scale_factor"]
