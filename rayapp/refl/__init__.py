"""ReFL (reward feedback learning) of Stable Diffusion on Ray Train + DeepSpeed: config, objective, its task in
the shared loop, driver, data, evaluation and pictures.

    from rayapp.refl import ReFLConfig, run_refl
    result = run_refl(ReFLConfig.from_preset("offline", output_dir="runs/refl"))
"""
from __future__ import annotations

from .config import ReFLConfig
from .driver import ReFLResult, run_refl

__all__ = ["ReFLConfig", "ReFLResult", "run_refl"]
