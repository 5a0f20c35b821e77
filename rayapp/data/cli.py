"""`rayapp data convert` (ImageRewardDB JSON or hub release, Pick-a-Pic / pairs tables -> Parquet shards),
`data synth` (synthetic set), `data stats` (counts and rating histograms). Paths may be URIs (s3://, gs://, ...)."""
from __future__ import annotations

import argparse
import sys

MAX_SKIPPED_SHOWN = 50


def _convert(args: argparse.Namespace) -> int:
    from rayapp.data.formats import BadRecordsError, convert_source

    def say_detected(fmt: str, why: str) -> None:
        print(f"--format auto: reading {args.source} as {fmt} ({why})", file=sys.stderr)

    splits = [s for value in (args.split or []) for s in value.split(",") if s.strip()] or None
    try:
        reports = convert_source(args.source, args.out, fmt=args.format, image_root=args.image_root, splits=splits,
                                 subset=args.subset, skip_bad=args.skip_bad, rows_per_shard=args.rows_per_shard,
                                 overwrite=args.overwrite, on_detect=say_detected)
    except BadRecordsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:  # missing input, non-empty output, StorageError (an OSError), options
        print(f"error: {err}", file=sys.stderr)
        return 2
    for report in reports:
        for record_id, reason in report.bad[:MAX_SKIPPED_SHOWN]:
            print(f"skipped {record_id}: {reason}", file=sys.stderr)
        if len(report.bad) > MAX_SKIPPED_SHOWN:
            print(f"... and {len(report.bad) - MAX_SKIPPED_SHOWN} more skipped", file=sys.stderr)
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
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(stats["kinds"].items()))
    print(f"{args.path}: {stats['prompts']} prompts, {stats['images']} images, "
          f"{stats['pairs']} unequal-rank pairs ({kinds or 'none'}), {stats['tied_pairs']} tied pairs")
    for name, histogram in stats["ratings"].items():
        print(f"{name}: " + format_histogram(histogram))
    if stats["classification"]:
        shown = sorted(stats["classification"].items(), key=lambda kv: (-kv[1], str(kv[0])))
        print("classification (images): " + ", ".join(f"{label} {n}" for label, n in shown))
    return 0


def format_histogram(histogram: dict) -> str:
    """"1: 3, 2: 10, ..., missing: 1" plus a bar per value, so the shape shows in a terminal."""
    values = sorted(k for k in histogram if k is not None)
    total = sum(histogram.values()) or 1
    parts = [f"{v}: {histogram[v]} {'#' * max(1, round(20 * histogram[v] / total))}" for v in values]
    if None in histogram:
        parts.append(f"missing: {histogram[None]}")
    return " | ".join(parts)


def register(subparsers) -> None:
    """Add `data convert` and `data synth` to the `rayapp` parser."""
    data = subparsers.add_parser("data", help="comparison data: convert to Parquet shards, make a synthetic set, stats")
    commands = data.add_subparsers(dest="data_command", required=True)

    conv = commands.add_parser(
        "convert", help="comparison data -> Parquet shards with the images inline",
        description="Convert ImageRewardDB (GitHub JSON or the hub release), Pick-a-Pic-style or plain pair tables "
                    "to comparison shards. SOURCE and --out may be local paths or URIs (s3://, gs://, ...).")
    conv.add_argument("source", help="JSON file; ImageRewardDB folder (snapshot of THUDM/ImageRewardDB); or a "
                                     "Parquet / Arrow table (file or dir) of pairs")
    conv.add_argument("--format", default="auto", choices=["auto", "json", "imagerewarddb", "pickapic", "pairs"],
                      help="source format (default auto: picked from the name, layout or columns, and said)")
    conv.add_argument("--image-root", help="JSON: directory the generation paths are relative to (required); "
                                           "pair tables: base of path-valued image cells (default: the table's dir)")
    conv.add_argument("--split", action="append",
                      help="imagerewarddb: train, validation, test or all (default); repeatable or comma-separated; "
                           "each goes to OUT/<split>")
    conv.add_argument("--subset", choices=["1k", "2k", "4k", "8k"],
                      help="imagerewarddb: the train subset (first 4/8/16/32 train zips; default: every zip found)")
    conv.add_argument("--out", required=True, help="output directory for part-NNNNN.parquet shards (path or URI)")
    conv.add_argument("--skip-bad", action="store_true",
                      help="skip bad records (each reported by id) instead of failing")
    conv.add_argument("--rows-per-shard", type=int, default=None,
                      help="prompts per Parquet file (default 256; files also close at 256 MB of images)")
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

    stats = commands.add_parser("stats", help="prompts, images, pairs (per kind) and rating histograms of shards")
    stats.add_argument("path", help="Parquet shard dir or file (path or URI)")
    stats.set_defaults(func=_stats)
