"""How far ReFL's differentiable preprocessing (gradient path) is from the PIL one (scoring path), for tests.

ReFL optimises `model.reward(images)`, which resizes and crops a float tensor with `preprocess_tensor`
(antialiased bicubic in torch, no quantisation). Scoring a saved image goes through `preprocess_pil` (8-bit
quantisation, Pillow's bicubic resize, center crop). The two differ by (a) the uint8 rounding of the image and
(b) the resampling kernels. `preprocessing_gap` measures both, in pixel units of the normalised RM input and in
reward units; docs/REFL.md quotes its figures.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rayapp.model.images import CLIP_STD, preprocess_pil, preprocess_tensor
from rayapp.refl.preprocess import to_pil_images


def preprocessing_gap(images_0_1: torch.Tensor, image_size: int, model=None,
                      prompts: Sequence[str] | str | None = None) -> dict:
    """Compare `preprocess_tensor` (gradient path) with `preprocess_pil` (scoring path) on a batch.

    images_0_1: [B,3,H,W] float in [0,1]. image_size: the RM's input size (224 for ImageReward-v1.0).
    Returns, over the batch (pixel figures in normalised RM-input units, i.e. (x - mean) / std; one 8-bit
    step is about 1/255/0.27 = 0.015 of them):
      max_abs_pixel_diff, mean_abs_pixel_diff: tensor path on the float images vs PIL path on the 8-bit
        images (the gap ReFL actually has);
      max_abs_pixel_diff_quantized, mean_abs_pixel_diff_quantized: both paths on the same 8-bit images
        (the resampling-kernel part alone);
      max_abs_pixel_diff_0_1: max_abs_pixel_diff converted back to [0,1] image units (x std);
    and with `model` (an ImageReward) and `prompts`:
      max_abs_reward_diff, mean_abs_reward_diff: |model.reward(images) - model.score(PIL images)|;
      mean_reward_tensor, mean_reward_pil.
    """
    images_0_1 = images_0_1.detach().float().cpu()
    pils = to_pil_images(images_0_1)
    pil_batch = torch.stack([preprocess_pil(p, image_size) for p in pils])
    tensor_batch = preprocess_tensor(images_0_1, image_size)
    quantized = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 255.0).permute(2, 0, 1) for p in pils])
    tensor_quantized = preprocess_tensor(quantized, image_size)
    diff = (tensor_batch - pil_batch).abs()
    diff_q = (tensor_quantized - pil_batch).abs()
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out = {
        "images": int(images_0_1.shape[0]),
        "input_size": list(images_0_1.shape[-2:]),
        "image_size": int(image_size),
        "max_abs_pixel_diff": float(diff.max()),
        "mean_abs_pixel_diff": float(diff.mean()),
        "max_abs_pixel_diff_quantized": float(diff_q.max()),
        "mean_abs_pixel_diff_quantized": float(diff_q.mean()),
        "max_abs_pixel_diff_0_1": float((diff * std).max()),
    }
    if model is not None:
        if prompts is None:
            raise ValueError("pass prompts with model")
        batch = images_0_1.shape[0]
        prompts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            r_tensor = model.reward(images_0_1.to(model.device), prompts).float().cpu()
        r_pil = torch.tensor(model.score_pairs(prompts, pils), dtype=torch.float32)
        model.train(was_training)
        rdiff = (r_tensor - r_pil).abs()
        out.update({
            "max_abs_reward_diff": float(rdiff.max()),
            "mean_abs_reward_diff": float(rdiff.mean()),
            "mean_reward_tensor": float(r_tensor.mean()),
            "mean_reward_pil": float(r_pil.mean()),
        })
    return out


def smooth_test_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0,1] (upsampled low-res noise plus a few hard-edged discs): natural-ish
    content with both smooth regions and edges, where resampling kernels differ most."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, max(2, height // 16), max(2, width // 16), generator=gen)
    imgs = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    for b in range(count):
        for _ in range(3):
            cy, cx = torch.rand(2, generator=gen) * torch.tensor([height, width], dtype=torch.float32)
            radius = (0.08 + 0.15 * torch.rand(1, generator=gen)) * min(height, width)
            colour = torch.rand(3, 1, generator=gen)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2
            imgs[b][:, mask] = colour.expand(3, int(mask.sum()))
    return imgs.clamp(0, 1)
