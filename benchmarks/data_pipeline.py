"""Throughput of the data pipeline alone: Parquet -> pairs -> decode + preprocess_pil + tokenise (Ray Data).

Run:  python benchmarks/data_pipeline.py [--prompts 300] [--per-prompt 6] [--image-size 64] [--actors 2]
      [--data DIR (an existing `rayapp data synth` dir)] [--num-cpus 8]
Starts a local Ray with --num-cpus logical CPUs, or joins RAY_ADDRESS when set. Prints figures; asserts nothing.
Images/s counts preprocessed images leaving the pipeline (2 per pair); a single-process loop over the same
pairs with the same functions (no Ray) is printed next to it for scale.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _single_process(data: Path, image_size: int, limit: int) -> float:
    """Pairs/s of decode + preprocess_pil (both images) + tokenise in this process, first `limit` pairs."""
    from rayapp.data.pairs import iter_pairs
    from rayapp.model.images import load_image, preprocess_pil
    from rayapp.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data / "tokenizer")
    start, n = time.perf_counter(), 0
    for pair in iter_pairs(data / "train"):
        preprocess_pil(load_image(pair["image_better"]), image_size)
        preprocess_pil(load_image(pair["image_worse"]), image_size)
        tokenizer([pair["prompt"]], padding="max_length", truncation=True, max_length=35)
        n += 1
        if n >= limit:
            break
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="existing synth dir (train/ + tokenizer/); default: make one")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--per-prompt", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64, help="pipeline output side (preset image_size)")
    parser.add_argument("--actors", type=int, default=2, help="preprocessing actors")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray (ignored with RAY_ADDRESS)")
    parser.add_argument("--epochs", type=int, default=2, help="passes; the first includes actor start-up")
    args = parser.parse_args()

    import ray

    from rayapp.data.pairs import pair_stats
    from rayapp.data.pipeline import build_pair_dataset
    from rayapp.data.synth import write_synthetic_set

    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="rayapp-bench-data-")
        data = Path(tmp.name) / "set"
        start = time.perf_counter()
        write_synthetic_set(data, prompts=args.prompts, per_prompt=args.per_prompt, seed=0,
                            val_fraction=0.0, test_fraction=0.0, progress=False)
        elapsed = time.perf_counter() - start
        print(f"synth: {args.prompts * args.per_prompt} images in {elapsed:.1f} s "
              f"({args.prompts * args.per_prompt / elapsed:.0f} images/s generated)")
    stats = pair_stats(data / "train")
    print(f"data: {stats['prompts']} prompts, {stats['images']} images, {stats['pairs']} pairs; "
          f"output {args.image_size} px, {args.actors} preprocessing actors, batch {args.batch_size}")

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ds = build_pair_dataset(data / "train", image_size=args.image_size, tokenizer_dir=data / "tokenizer",
                            max_length=35, shuffle_seed=0, batch_size=args.batch_size,
                            preprocess_actors=args.actors)
    for epoch in range(args.epochs):
        start, pairs = time.perf_counter(), 0
        for batch in ds.iter_batches(batch_size=args.batch_size, batch_format="numpy"):
            pairs += len(batch["pair_kind"])
        elapsed = time.perf_counter() - start
        print(f"ray data pass {epoch + 1}: {pairs} pairs in {elapsed:.1f} s = {pairs / elapsed:.0f} pairs/s, "
              f"{2 * pairs / elapsed:.0f} images/s" + (" (includes start-up)" if epoch == 0 else ""))
    ray.shutdown()

    rate = _single_process(data, args.image_size, limit=min(stats["pairs"], 2000))
    print(f"single process, no Ray: {rate:.0f} pairs/s, {2 * rate:.0f} images/s")
    print(f"machine: {os.cpu_count()} CPUs visible")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
