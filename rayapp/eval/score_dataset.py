"""`rayapp score-dataset` and `jobs/score_dataset.py`: score an image collection with Ray Data (actor pool per
scorer), writing Parquet incrementally.

Local (starts or joins a local Ray):
    rayapp score-dataset --input data/test --output scores/ --scorer ImageReward --scorer CLIP
    rayapp score-dataset --input shots/ --prompts-file shots/prompts.jsonl --output scores/ \\
        --scorer ImageReward --concurrency 2 --batch-size 32
    rayapp score-dataset ... --resume          # after a crash: only rows not yet written
From and to an object store (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL or
the default chain; gs://, abfs://, ... work the same with their packages):
    rayapp score-dataset --input s3://bucket/data/test --output s3://bucket/scores/test --resume
On a cluster (local paths must be visible to every node; URIs always are):
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/score_dataset.py --input s3://bucket/data --output s3://bucket/scores --scorer ImageReward \\
        --concurrency 4 --num-gpus 1 --dtype float16

Inputs: Parquet with an image-bytes column (`--image-column`, default image) and `--prompt-column`; the
comparison shards of `rayapp data` (one list of scores per prompt); or a folder of images + a JSONL/CSV
prompts file with `prompt` and `path`. Image cells may be bytes or Hugging Face `{"bytes", "path"}` dicts.
Output: part-*.parquet files written by the workers, each input row + `score_<label>` + `score_error` +
`_row_key`. The summary line prints rows/s and images/s.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rayapp.job_command import JobCommand


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The job's flags."""
    p.add_argument("--input", required=True,
                   help="Parquet file/dir, comparison shards, or an image folder (local path or URI)")
    p.add_argument("--output", required=True, help="output directory for part-*.parquet (local path or URI)")
    p.add_argument("--scorer", action="append",
                   help="[LABEL=]SPEC, repeatable (default ImageReward): ImageReward, CLIP, BLIP, Aesthetic, "
                        "PickScore, HPSv2, HPSv2.1, "
                        "NAME:tiny, a saved model dir, owner/repo or hf://owner/repo[/dir]")
    p.add_argument("--format", default="auto", choices=["auto", "images", "comparison", "folder"])
    p.add_argument("--prompts-file", help="folder input: JSONL/CSV with prompt, path (default <folder>/prompts.jsonl)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--key-column", help="a unique id column to key rows by (default: file + row number)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call in an actor (default 16)")
    p.add_argument("--rows-per-block", type=int, default=64, help="input rows per block / output part (default 64)")
    p.add_argument("--concurrency", type=int, default=1, help="actors per scorer (default 1)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (default 0)")
    p.add_argument("--device", help="default: cuda when the actor sees a GPU, else cpu")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    p.add_argument("--tokenizer", help="tokenizer for a reward model saved without one")
    p.add_argument("--resume", action="store_true", help="skip rows already in --output")
    p.add_argument("--overwrite", action="store_true", help="delete existing part files first")
    p.add_argument("--drop-images", action="store_true", help="do not copy image bytes into the output")
    p.add_argument("--summary-json", help="also write the summary (rows/s, images/s, files) here")
    p.add_argument("--no-progress", action="store_true")




def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Score the input with every scorer and print the summary; bad input ends with a message and status 2."""
    from rayapp.data.storage import StorageError
    from rayapp.eval.batch_scoring import ScoreJobConfig, run_score_job

    config = ScoreJobConfig(
        input=args.input, output=args.output, scorers=args.scorer or ["ImageReward"], input_format=args.format,
        prompts_file=args.prompts_file, image_column=args.image_column, prompt_column=args.prompt_column,
        key_column=args.key_column, batch_size=args.batch_size, rows_per_block=args.rows_per_block,
        concurrency=args.concurrency, num_cpus=args.num_cpus, num_gpus=args.num_gpus, device=args.device,
        dtype=args.dtype, tokenizer=args.tokenizer, resume=args.resume, overwrite=args.overwrite,
        drop_images=args.drop_images, progress=not args.no_progress,
    )
    try:
        result = run_score_job(config)
    except (ValueError, FileNotFoundError, FileExistsError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


COMMAND = JobCommand("score-dataset", "score an image collection with Ray Data into Parquet", __doc__, add_arguments,
                     run)
build_parser, main, register = COMMAND.build_parser, COMMAND.main, COMMAND.register
