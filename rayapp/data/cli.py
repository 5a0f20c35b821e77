"""`rayapp data convert` (ImageRewardDB JSON -> Parquet shards), `data synth` (synthetic set), `data stats`."""
from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from rayapp.data.formats import BadRecordsError, convert

    try:
        report = convert(args.json, args.image_root, args.out, skip_bad=args.skip_bad,
                         rows_per_shard=args.rows_per_shard, overwrite=args.overwrite)
    except BadRecordsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for record_id, reason in report.bad:
        print(f"skipped {record_id}: {reason}", file=sys.stderr)
    print(f"wrote {report.rows} prompts ({report.images} images, {report.pairs} unequal-rank pairs) "
          f"in {len(report.shards)} shards to {report.out_dir}; skipped {len(report.bad)} bad records")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from rayapp.data.synth import write_synthetic_set

    attributes = tuple(a.strip() for a in args.attributes.split(",") if a.strip())
    try:
        report = write_synthetic_set(
            args.out, prompts=args.prompts, per_prompt=args.per_prompt, seed=args.seed,
            image_size=args.image_size, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
            attributes=attributes, rows_per_shard=args.rows_per_shard, overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, rows in report.rows.items():
        print(f"{split}: {rows} prompts, {report.pairs[split]} unequal-rank pairs -> {report.out_dir}/{split}")
    print(f"tokenizer -> {report.tokenizer_dir}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from rayapp.data.pairs import pair_stats

    try:
        stats = pair_stats(args.path)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(stats["kinds"].items()))
    print(f"{args.path}: {stats['prompts']} prompts, {stats['images']} images, "
          f"{stats['pairs']} unequal-rank pairs ({kinds or 'none'})")
    return 0


def register(subparsers) -> None:
    """Add `data convert` and `data synth` to the `rayapp` parser."""
    data = subparsers.add_parser("data", help="comparison data: convert JSON to Parquet, make a synthetic set, count pairs")
    commands = data.add_subparsers(dest="data_command", required=True)

    conv = commands.add_parser("convert", help="ImageRewardDB-style JSON -> Parquet shards with the images inline")
    conv.add_argument("json", help="JSON file: a list of {id, prompt, generations: [paths], ranking: [ints]}")
    conv.add_argument("--image-root", required=True, help="directory the generation paths are relative to")
    conv.add_argument("--out", required=True, help="output directory for part-NNNNN.parquet shards")
    conv.add_argument("--skip-bad", action="store_true",
                      help="skip bad records (each reported by id) instead of failing")
    conv.add_argument("--rows-per-shard", type=int, default=256, help="prompts per Parquet file (default 256)")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    conv.set_defaults(func=_convert)

    syn = commands.add_parser("synth", help="procedurally drawn comparison set (train/val/test + tokenizer)")
    syn.add_argument("--prompts", type=int, default=1000, help="prompts over all splits (default 1000)")
    syn.add_argument("--per-prompt", type=int, default=6, help="candidate images per prompt (default 6)")
    syn.add_argument("--out", required=True, help="output directory (gets train/ val/ test/ tokenizer/)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    syn.add_argument("--val-fraction", type=float, default=0.1)
    syn.add_argument("--test-fraction", type=float, default=0.1)
    syn.add_argument("--attributes", default="colour,size",
                     help="caption attributes a candidate may get wrong (subset of colour,count,size; "
                          "default colour,size: the tiny preset does not learn to count)")
    syn.add_argument("--rows-per-shard", type=int, default=256, help="prompts per Parquet file (default 256)")
    syn.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    syn.set_defaults(func=_synth)

    stats = commands.add_parser("stats", help="prompts, images and pairs (per kind) of a Parquet shard dir")
    stats.add_argument("path", help="Parquet shard dir or file")
    stats.set_defaults(func=_stats)
