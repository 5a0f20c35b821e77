"""Images/s of the Ray Data scoring job (1 and 2 actors) vs a plain single-process loop, same images.

    python benchmarks/batch_scoring.py                         # tiny and full-size presets, CPU
    python benchmarks/batch_scoring.py --preset full --images 64 --batch-size 16 --num-gpus 1   # on a GPU node

Both sides do the same work per image: decode PNG bytes -> preprocess_pil -> model.score_batch, with the
same batch size, and the loop runs with as many torch threads as one actor gets (`--loop-threads`; on a
shared, oversubscribed CPU a multi-threaded loop can be several times slower). The reward model has random
weights of the preset's shape (the full preset is the real ViT-L/16 + BERT-base architecture); throughput does
not depend on the weights. The Ray figures include
actor start-up and model loading (what a user waits for); the loop's include model loading too; "steady"
(loop only) excludes its model load. For Ray the time to the first written block is shown; a per-block
rate from the driver's side is not reported because Ray Data hands finished blocks to the driver in bursts.
Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {"tiny": "tiny", "full": "imagereward-v1"}


def make_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = (rng.random((size, size, 3)) * 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_input(images: list[bytes], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [f"a {c} circle" for c in ("red", "green", "blue", "yellow")]
    pq.write_table(pa.table({"prompt": [prompts[i % 4] for i in range(len(images))], "image": images}), path)


def save_model(preset: str, out: Path, tokenizer_dir: Path) -> None:
    import rayapp
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    build_wordpiece_tokenizer(["a", "red", "green", "blue", "yellow", "circle"], save_dir=tokenizer_dir)
    rayapp.create_model(PRESETS[preset], tokenizer=tokenizer_dir, seed=0).save_pretrained(out)


def plain_loop(model_dir: Path, images: list[bytes], batch_size: int, device: str) -> tuple[float, float]:
    """(total seconds incl. load, steady seconds excl. load) for a single-process loop."""
    import torch

    import rayapp

    prompts = [f"a {c} circle" for c in ("red", "green", "blue", "yellow")]
    start = time.perf_counter()
    model = rayapp.load(model_dir, device=device)
    loaded = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            model.score_pairs([prompts[(i + k) % 4] for k in range(len(chunk))], chunk, batch_size=batch_size)
    end = time.perf_counter()
    return end - start, end - loaded


def ray_job(model_dir: Path, input_path: Path, out: Path, actors: int, batch_size: int, num_cpus: float,
            num_gpus: float) -> float:
    from rayapp.eval.batch_scoring import ScoreJobConfig, run_score_job

    config = ScoreJobConfig(input=str(input_path), output=str(out), scorers=[str(model_dir)], batch_size=batch_size,
                            rows_per_block=batch_size * 2, concurrency=actors, num_cpus=num_cpus, num_gpus=num_gpus,
                            drop_images=True, overwrite=True, progress=False)
    result = run_score_job(config)
    return result.seconds, result.first_block_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["tiny", "full", "both"], default="both")
    parser.add_argument("--images", type=int, default=0, help="images per run (default 256 tiny, 32 full)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the random PNGs (default 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (0.5 puts 2 actors on 1 GPU)")
    parser.add_argument("--actors", default="1,2", help="actor counts to run (default 1,2)")
    parser.add_argument("--loop-threads", type=int, default=-1,
                        help="torch threads for the plain loop (default: the CPUs of one actor, like for like; "
                             "0 = torch's default, all cores)")
    args = parser.parse_args()

    import ray
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.loop_threads < 0:
        args.loop_threads = max(1, int(args.num_cpus))  # Ray gives each actor OMP_NUM_THREADS = its CPUs
    if args.loop_threads:
        torch.set_num_threads(args.loop_threads)
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="rayapp-bench-scoring-"))
    presets = ["tiny", "full"] if args.preset == "both" else [args.preset]
    rows = []
    for preset in presets:
        n = args.images or (256 if preset == "tiny" else 32)
        images = make_images(n, args.image_size)
        input_path = work / f"{preset}-input.parquet"
        write_input(images, input_path)
        model_dir = work / f"{preset}-model"
        save_model(preset, model_dir, work / "tokenizer")
        total, steady = plain_loop(model_dir, images, args.batch_size, device)
        rows.append((preset, "plain loop (1 process)", n, total, n / total, n / steady))
        print(rows[-1], flush=True)
        for actors in [int(a) for a in args.actors.split(",")]:
            seconds, first = ray_job(model_dir, input_path, work / f"{preset}-out-{actors}", actors, args.batch_size,
                              args.num_cpus, args.num_gpus)
            rows.append((preset, f"Ray Data, {actors} actor(s) (first block at {first:.1f} s)", n, seconds,
                         n / seconds, float("nan")))
            print(rows[-1], flush=True)
    print(f"\ndevice: {device}, torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, "
          f"batch {args.batch_size}, {args.image_size}px PNG inputs")
    print("| preset | runner | images | seconds | images/s (incl. load) | images/s (steady) |")
    print("|---|---|---:|---:|---:|---:|")
    for preset, runner, n, seconds, ips, steady in rows:
        steady_text = "-" if math.isnan(steady) else f"{steady:.3g}"
        print(f"| {preset} | {runner} | {n} | {seconds:.1f} | {ips:.3g} | {steady_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
