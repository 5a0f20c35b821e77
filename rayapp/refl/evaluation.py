"""Held-out evaluation of a ReFL run: fixed prompts x seeds, their rewards, and a grid PNG."""
from __future__ import annotations

import torch

from .config import ReFLConfig
from .models import DiffusionParts
from .objective import generate


def evaluate_held_out(unet, parts: DiffusionParts, rm, cfg: ReFLConfig, device: torch.device, precision: str,
             step: int) -> tuple[dict, bytes]:
    """Held-out prompts x seeds: images, RM rewards (PIL scoring path and differentiable path), grid PNG."""
    from .preprocess import to_pil_images
    from .viz import png_bytes, reward_grid

    prompts = [p for p in cfg.eval_prompts for _ in cfg.eval_seeds]
    seeds = [s for _ in cfg.eval_prompts for s in cfg.eval_seeds]
    was_training = unet.training
    unet.eval()
    images = torch.cat([generate(unet, parts, prompts[i:i + 8], seeds[i:i + 8], cfg, device, precision)
                        for i in range(0, len(prompts), 8)])
    unet.train(was_training)
    with torch.no_grad():
        r_tensor = rm.reward(images, prompts).float().cpu()
    pils = to_pil_images(images)
    per_term = rm.score_terms(prompts, pils) if hasattr(rm, "score_terms") else {}
    r_pil = rm.combine(per_term) if per_term else rm.score_pairs(prompts, pils)
    grid = reward_grid(pils, prompts, r_pil, columns=len(cfg.eval_seeds),
                       title=f"step {step}: mean reward {sum(r_pil) / len(r_pil):+.4f}")
    metrics = {"step": step, "eval_reward": float(sum(r_pil) / len(r_pil)),
               "eval_reward_tensor": float(r_tensor.mean()),
               "eval_rewards": [round(float(r), 6) for r in r_pil]}
    if len(per_term) > 1:  # a mix: each term's mean, unweighted, in its own units
        metrics.update({f"eval_reward/{term}": float(sum(v) / len(v)) for term, v in per_term.items()})
    return metrics, png_bytes(grid)


