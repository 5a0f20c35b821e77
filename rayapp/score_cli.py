"""`rayapp score`: rank images for a prompt with a local model or a running endpoint.

It sits above both `rayapp.model` (local scoring) and `rayapp.serve.client` (HTTP), so neither depends
on the other. Heavy imports happen inside `run`.
"""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add `score` to the `rayapp` parser."""
    parser = subparsers.add_parser(
        "score", help="score images against a prompt",
        description="Score images for a prompt; prints a table sorted by score (best first).",
    )
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--prompt", required=True, help="the text prompt")
    parser.add_argument("--model", default="ImageReward-v1.0",
                        help="a scorer spec (rayapp.scorers): a name in any case (ImageReward, CLIP, BLIP, "
                             "Aesthetic, PickScore, HPSv2, HPSv2.1), NAME:tiny, an official ImageReward.pt, a saved "
                             "directory or a URI (default: %(default)s)")
    parser.add_argument("--endpoint", help="score through a running rayapp Serve endpoint (http://host:port) instead")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def score_images(args: argparse.Namespace) -> tuple[str, list[float]]:
    """(what scored them, one score per image) through the endpoint or a locally loaded model."""
    if args.endpoint:
        from rayapp.serve.client import RewardClient

        return args.endpoint, RewardClient(args.endpoint).score(args.prompt, args.images)
    from rayapp import scorers

    model = scorers.load(args.model, device=args.device, dtype=args.dtype)
    scores = model.score(args.prompt, args.images, batch_size=args.batch_size,
                         progress=len(args.images) > args.batch_size)
    return args.model, scores


def run(args: argparse.Namespace) -> int:
    """Print the images ranked by score, as a table or as JSON."""
    model_name, scores = score_images(args)
    rows = sorted(zip(args.images, scores), key=lambda row: -row[1])
    if args.json:
        print(json.dumps({
            "model": model_name, "prompt": args.prompt,
            "results": [{"rank": r, "image": img, "score": s} for r, (img, s) in enumerate(rows, start=1)],
        }, indent=2))
        return 0
    width = max(len("image"), *(len(img) for img, _ in rows))
    print(f"{'rank':>4}  {'score':>8}  {'image':<{width}}")
    for rank, (img, score) in enumerate(rows, start=1):
        print(f"{rank:>4}  {score:>8.4f}  {img:<{width}}")
    return 0
