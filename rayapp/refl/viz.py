"""ReFL pictures: a grid of held-out samples with their rewards, and the reward curve."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path


def reward_grid(images: Sequence, prompts: Sequence[str], scores: Sequence[float], *, columns: int | None = None,
                title: str | None = None, cell: int | None = None):
    """A PIL image: each sample with "r=<score>" and its prompt (truncated) written under it.

    images: PIL images (all the same size); one row per prompt when `columns` is the number of seeds.
    cell: displayed size of each image in pixels (small images are upscaled, nearest); default max(128, size).
    """
    from PIL import Image, ImageDraw, ImageFont

    if not (len(images) == len(prompts) == len(scores)) or not images:
        raise ValueError("reward_grid needs equally many (>0) images, prompts and scores")
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    size = cell or max(128, images[0].size[0])
    font = ImageFont.load_default()
    text_h = 28
    top = 16 if title else 0
    grid = Image.new("RGB", (columns * size, top + rows * (size + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    chars = max(8, size // 6)
    for i, (img, prompt, score) in enumerate(zip(images, prompts, scores)):
        r, c = divmod(i, columns)
        x, y = c * size, top + r * (size + text_h)
        shown = img.convert("RGB")
        if shown.size != (size, size):
            resample = Image.Resampling.NEAREST if shown.size[0] < size else Image.Resampling.BICUBIC
            shown = shown.resize((size, size), resample)
        grid.paste(shown, (x, y))
        draw.text((x + 3, y + size + 1), f"r={score:+.3f}", fill="black", font=font)
        draw.text((x + 3, y + size + 14), prompt[:chars], fill=(90, 90, 90), font=font)
    return grid


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def reward_curve(history: Sequence[dict], path: str | os.PathLike, *, key: str = "eval_reward",
                 title: str = "ReFL: mean reward on held-out prompts") -> Path:
    """Plot `key` (and eval_reward_tensor if present) against "step" from eval records; save a PNG.

    A reward mix's terms (`eval_reward/<term>`, each in its own units) get a panel each beside the sum."""
    from rayapp.eval.plots import pyplot, save_png

    plt = pyplot()
    points = [(h["step"], h[key]) for h in history if key in h]
    if not points:
        raise ValueError(f"no {key!r} in the history")
    terms = list(dict.fromkeys(k.split("/", 1)[1] for h in history for k in h if k.startswith(f"{key}/")))
    fig, axes = plt.subplots(1, 1 + len(terms), figsize=(6 + 4 * len(terms), 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    for term_ax, term in zip(axes[0][1:], terms):
        term_points = [(h["step"], h[f"{key}/{term}"]) for h in history if f"{key}/{term}" in h]
        term_ax.plot([p[0] for p in term_points], [p[1] for p in term_points], marker="o", color="tab:green")
        term_ax.set_title(f"term {term} (unweighted)")
        term_ax.set_xlabel("optimizer update")
        term_ax.grid(alpha=0.3)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{key} (PIL scoring path)")
    tensor = [(h["step"], h["eval_reward_tensor"]) for h in history if "eval_reward_tensor" in h]
    if tensor:
        ax.plot([p[0] for p in tensor], [p[1] for p in tensor], linestyle="--", marker=".",
                label="eval_reward_tensor (differentiable path)")
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("mean reward (RM units)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return save_png(fig, path)
