"""Scoring throughput: the reference's one-image-at-a-time fp32 loop vs our batched fp32 / bf16 / fp16.

    python benchmarks/score_throughput.py                      # full-size ImageReward-v1 (random weights), CPU
    python benchmarks/score_throughput.py --device cuda        # same on a GPU (adds fp16)
    python benchmarks/score_throughput.py --preset tiny --images 64

Prints images/s per mode and the speed-up over the reference-style loop. No assertions.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from rayapp.model.config import get_preset
from rayapp.model.images import preprocess_pil
from rayapp.model.modeling import ImageReward
from rayapp.model.tokenizer import build_wordpiece_tokenizer

PROMPT = "a photo of a red circle next to two blue squares on a white background"


def make_images(count: int) -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(512, 512, 3) * 255).astype(np.uint8)) for _ in range(count)]


def reference_style_loop(model: ImageReward, images) -> None:
    """What the reference package does: one image per forward, fp32, autograd left on."""
    input_ids, attention_mask = model.tokenize([PROMPT])
    for img in images:
        pixels = preprocess_pil(img, model.config.image_size)[None]
        model.normalize(model(pixels, input_ids, attention_mask)).item()


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="imagereward-v1")
    parser.add_argument("--images", type=int, default=16, help="images scored against one prompt")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = build_wordpiece_tokenizer(PROMPT.split())
    config = get_preset(args.preset, tokenizer=None)
    model = ImageReward(config, tokenizer).eval().to(args.device)
    images = make_images(args.images)
    print(f"preset={args.preset} device={args.device} images={args.images} batch_size={args.batch_size} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")

    baseline = timed(lambda: reference_style_loop(model, images), args.repeats)
    print(f"{'reference-style loop (fp32, bs=1)':<36} {args.images / baseline:8.2f} img/s  1.00x")
    dtypes = ["float32", "bfloat16"] + (["float16"] if args.device.startswith("cuda") else [])
    for dtype in dtypes:
        model.set_dtype(dtype)
        seconds = timed(lambda: model.score(PROMPT, images, batch_size=args.batch_size), args.repeats)
        print(f"{'rayapp batched (' + dtype + ')':<36} {args.images / seconds:8.2f} img/s  {baseline / seconds:.2f}x")
    model.set_dtype("float32")


if __name__ == "__main__":
    main()
