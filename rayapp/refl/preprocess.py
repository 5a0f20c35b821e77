"""Generated float images as the scoring path sees them: 8-bit PIL images, as a saved PNG holds them.

ReFL's gradient flows through `preprocess_tensor` on float images; held-out evaluation scores the 8-bit
images a user would save (`preprocess_pil`), so it converts them here. tests/preprocess_probe.py measures how
far the two paths are apart.
"""
from __future__ import annotations

import numpy as np
import torch


def to_pil_images(images_0_1: torch.Tensor) -> list:
    """[B,3,H,W] floats in [0,1] -> 8-bit PIL images (round to nearest), as a saved PNG would hold."""
    from PIL import Image

    arr = (images_0_1.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255.0).round()
    return [Image.fromarray(a.astype(np.uint8)) for a in arr]
