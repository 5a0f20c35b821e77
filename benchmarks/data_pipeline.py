"""Throughput of the data pipeline alone, Ray Data against a plain loop, side by side in one run.

Run:  python benchmarks/data_pipeline.py [--prompts 300] [--per-prompt 6] [--image-size 64] [--cpus 1,2]
      [--repeats 3] [--data DIR (an existing `rayapp data synth` dir)] [--json FILE]

Both sides do Parquet -> (better, worse) pairs -> decode + crop + CLIP-normalise both images + tokenise,
for every unequal-rank pair of the set, and the consumer touches every batch:
- "plain": one process, no Ray, the shared functions pair by pair: `load_image` + `preprocess_pil` on both
  images of each pair and the tokenizer on its prompt (each image is decoded once per pair it is in);
- "plain, per prompt": the same functions, each image decoded once per prompt (shown for scale: what a
  careful single process gets);
- "ray C": `rayapp.data.pipeline.build_pair_dataset` (seeded shuffle included) on a local Ray started with
  C logical CPUs, every data task asking for 1 CPU and C preprocessing tasks at most, so it cannot use more
  than C processes at once; iterated with batches of 32 from the driver.
Ray passes after the first (worker start-up, imports) are timed; each repeat times one Ray pass and then
both plain loops, so a busy shared machine weighs on both sides alike. The figure the issue asks for is
"per CPU": (ray rate / C) / plain rate, reported per repeat and as the median. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def plain_per_pair(data: Path, image_size: int, max_length: int) -> tuple[int, float]:
    """(pairs, seconds) for decode + preprocess_pil of both images + tokenise, pair by pair, in this process."""
    from rayapp.data.pairs import iter_pairs
    from rayapp.model.images import load_image, preprocess_pil
    from rayapp.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data / "tokenizer")
    start, n = time.perf_counter(), 0
    for pair in iter_pairs(data / "train"):
        preprocess_pil(load_image(pair["image_better"]), image_size)
        preprocess_pil(load_image(pair["image_worse"]), image_size)
        tokenizer([pair["prompt"]], padding="max_length", truncation=True, max_length=max_length)
        n += 1
    return n, time.perf_counter() - start


def plain_per_prompt(data: Path, image_size: int, max_length: int) -> tuple[int, float]:
    """(pairs, seconds) with each image decoded and preprocessed once per prompt, then paired by index."""
    import torch

    from rayapp.data.pairs import pair_indices
    from rayapp.data.shards import iter_comparisons
    from rayapp.model.images import load_image, preprocess_pil
    from rayapp.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data / "tokenizer")
    start, n = time.perf_counter(), 0
    for record in iter_comparisons(data / "train"):
        pixels = torch.stack([preprocess_pil(load_image(image), image_size) for image in record["images"]])
        tokenizer([record["prompt"]], padding="max_length", truncation=True, max_length=max_length)
        taken = [(pixels[better], pixels[worse]) for better, worse in pair_indices(record["ranking"])]
        n += len(taken)
    return n, time.perf_counter() - start


def ray_pass(ds, batch_size: int) -> tuple[int, float]:
    """(pairs, seconds) for one full pass over the dataset from the driver."""
    start, n = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n += len(batch["pair_kind"])
    return n, time.perf_counter() - start


def run_cpus(data: Path, cpus: int, args) -> list[dict]:
    """Start Ray with `cpus` logical CPUs, warm up, then `repeats` x (Ray pass, plain, plain per prompt)."""
    import ray

    from rayapp.data.pipeline import build_pair_dataset

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        ds = build_pair_dataset(data / "train", image_size=args.image_size, tokenizer_dir=data / "tokenizer",
                                max_length=args.max_length, shuffle_seed=0, batch_size=args.batch_size,
                                cpus_per_task=1, concurrency=cpus)
        pairs, warm = ray_pass(ds, args.batch_size)
        print(f"ray {cpus} CPU(s): first pass {pairs} pairs in {warm:.1f} s (start-up included, not counted)",
              flush=True)
        rows = []
        for repeat in range(args.repeats):
            n_ray, t_ray = ray_pass(ds, args.batch_size)
            n_plain, t_plain = plain_per_pair(data, args.image_size, args.max_length)
            n_prompt, t_prompt = plain_per_prompt(data, args.image_size, args.max_length)
            row = {"cpus": cpus, "repeat": repeat + 1, "ray_pairs_s": n_ray / t_ray, "plain_pairs_s": n_plain / t_plain,
                   "plain_per_prompt_pairs_s": n_prompt / t_prompt}
            row["ratio_per_cpu"] = row["ray_pairs_s"] / cpus / row["plain_pairs_s"]
            row["ratio_per_cpu_vs_per_prompt"] = row["ray_pairs_s"] / cpus / row["plain_per_prompt_pairs_s"]
            rows.append(row)
            print(f"  repeat {repeat + 1}: ray {row['ray_pairs_s']:.0f} pairs/s, plain {row['plain_pairs_s']:.0f}, "
                  f"plain per prompt {row['plain_per_prompt_pairs_s']:.0f} -> ray per CPU / plain = "
                  f"{row['ratio_per_cpu']:.2f} (vs per prompt {row['ratio_per_cpu_vs_per_prompt']:.2f})", flush=True)
        return rows
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="existing synth dir (train/ + tokenizer/); default: make one")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--per-prompt", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64, help="pipeline output side (preset image_size)")
    parser.add_argument("--max-length", type=int, default=35)
    parser.add_argument("--batch-size", type=int, default=32, help="consumer batch size")
    parser.add_argument("--cpus", default="1,2", help="logical CPUs given to Ray, one run each (default 1,2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every repeat's figures here")
    args = parser.parse_args()

    from rayapp.data.pairs import pair_stats
    from rayapp.data.synth import write_synthetic_set

    os.environ.pop("RAY_ADDRESS", None)  # always a private local Ray: the CPU count is the point
    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="rayapp-bench-data-")
        data = Path(tmp.name) / "set"
        write_synthetic_set(data, prompts=args.prompts, per_prompt=args.per_prompt, seed=0,
                            val_fraction=0.0, test_fraction=0.0, progress=False)
    stats = pair_stats(data / "train")
    print(f"data: {stats['prompts']} prompts, {stats['images']} images, {stats['pairs']} pairs; output "
          f"{args.image_size} px; machine: {os.cpu_count()} CPUs visible, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    rows = []
    for cpus in [int(c) for c in args.cpus.split(",")]:
        rows.extend(run_cpus(data, cpus, args))
    print("\n| Ray CPUs | Ray pairs/s | plain pairs/s | plain per prompt pairs/s | Ray per CPU / plain (median) "
          "| Ray per CPU / plain per prompt (median) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for cpus in sorted({r["cpus"] for r in rows}):
        mine = [r for r in rows if r["cpus"] == cpus]

        def med(key, mine=mine):
            return statistics.median(r[key] for r in mine)

        print(f"| {cpus} | {med('ray_pairs_s'):.0f} | {med('plain_pairs_s'):.0f} | "
              f"{med('plain_per_prompt_pairs_s'):.0f} | {med('ratio_per_cpu'):.2f} | "
              f"{med('ratio_per_cpu_vs_per_prompt'):.2f} |")
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
