"""Stable Diffusion helpers for ReFL and generation: the offline tiny pipeline and a pipeline loader.

Importing this package is light; diffusers is imported inside the functions.
"""
from __future__ import annotations

from rayapp.diffusion.tiny import build_tiny_sd_pipeline, load_pipeline, pipeline_resolution, tiny_sd_pipeline

__all__ = ["build_tiny_sd_pipeline", "load_pipeline", "pipeline_resolution", "tiny_sd_pipeline"]
