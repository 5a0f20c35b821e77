"""`rayapp eval`: the paper's benchmarks. Heavy imports (torch, ray, matplotlib) happen inside the handlers.

    rayapp eval table3 --data DIR --scorer ImageReward --scorer CLIP --out table3.json
    rayapp eval table1 --prompts benchmark-prompts.json --generations-root generations/ --scorer ImageReward \
        --human-ranking paper --out table1.json --plot table1.png
    rayapp eval hps --prompts-dir benchmark/ --generations my_model/ --scorer HPSv2.1 --out hps.json
    rayapp eval rewards --prompts benchmark-prompts.json --generations-root generations/ --plot rewards.png

Reading inputs: `rayapp.eval.files`; scoring: `rayapp.eval.benchmarks`; report dict and Markdown:
`rayapp.eval.tables`; figures: `rayapp.eval.plots`. This module only wires arguments to them.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rayapp.scorers import describe_names


def run_table3(args: argparse.Namespace) -> dict:
    """Score the comparisons with every --scorer, print Table 3, return the report."""
    from rayapp.eval import benchmarks, files, tables
    from rayapp.eval.scorers import parse_spec

    specs = [parse_spec(s) for s in args.scorer]
    ks = [int(k) for k in args.ks.split(",")]
    records = files.load_comparison_records(args.data, args.image_root)
    if args.ray:
        scores = benchmarks.score_comparisons_ray(
            specs, args.data, records, scores_dir=args.scores_dir, batch_size=args.batch_size,
            concurrency=args.concurrency, num_gpus=args.num_gpus, dtype=args.dtype, tokenizer=args.tokenizer,
            progress=not args.quiet)
    else:
        scores = benchmarks.score_comparisons(specs, records, device=args.device, dtype=args.dtype,
                                              tokenizer=args.tokenizer, batch_size=args.batch_size,
                                              progress=not args.quiet)
    report = tables.table3_report(args.data, records, specs, scores, ks)
    print(tables.table3_markdown(report))
    if args.plot:
        from rayapp.eval.plots import plot_best_vs_worst

        plot_best_vs_worst(records, scores, args.plot)
        print(f"\nplot -> {args.plot}")
    return report


def run_table1(args: argparse.Namespace) -> dict:
    """Score every generator's images with every --scorer, print Table 1, return the report."""
    from rayapp.eval import benchmarks, files, tables
    from rayapp.eval.scorers import parse_spec

    prompts = files.load_prompt_list(args.prompts)
    dirs = files.generation_dirs(args.generations_root, args.generations)
    specs = [parse_spec(s) for s in args.scorer]
    human = files.read_human_ranking(args.human_ranking)
    scores = benchmarks.score_generations(specs, prompts, dirs, device=args.device, dtype=args.dtype,
                                          tokenizer=args.tokenizer, batch_size=args.batch_size,
                                          progress=not args.quiet)
    report = tables.table1_report(len(prompts), list(dirs), human, scores)
    print(tables.table1_markdown(report))
    if args.plot:
        from rayapp.eval.plots import plot_distributions

        plot_distributions(scores, args.plot)
        print(f"\nplot -> {args.plot}")
    return report


def run_hps(args: argparse.Namespace) -> dict:
    """The HPS v2 benchmark protocol over a generations folder: per style mean and std (x 100), printed."""
    from rayapp.eval.hps_benchmark import hps_markdown, run_hps_benchmark
    from rayapp.eval.scorers import load_scorer, parse_spec

    if args.scorer and len(args.scorer) > 1:
        raise ValueError("eval hps scores with one --scorer at a time")
    spec = parse_spec(args.scorer[0] if args.scorer else "HPSv2.1")
    scorer = load_scorer(spec, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    report = run_hps_benchmark(scorer, args.prompts_dir, args.generations, styles=args.style,
                               batch_size=args.batch_size, progress=not args.quiet)
    report["scorer"] = spec.label
    print(hps_markdown(report))
    return report


def run_rewards(args: argparse.Namespace) -> dict:
    """Generators x scorers (default: every registered scorer), printed as Markdown, with a plot."""
    from rayapp.eval import benchmarks, files, tables
    from rayapp.eval.scorers import parse_spec
    from rayapp.scorers import available_scores

    prompts = files.load_prompt_list(args.prompts)
    dirs = files.generation_dirs(args.generations_root, args.generations)
    specs = [parse_spec(s) for s in (args.scorer or available_scores())]
    scores = benchmarks.score_generations(specs, prompts, dirs, device=args.device, dtype=args.dtype,
                                          tokenizer=args.tokenizer, batch_size=args.batch_size,
                                          progress=not args.quiet)
    report = tables.multi_reward_report(len(prompts), list(dirs), scores)
    print(tables.multi_reward_markdown(report))
    if args.plot:
        from rayapp.eval.plots import plot_multi_reward

        plot_multi_reward(report, args.plot)
        print(f"\nplot -> {args.plot}")
    return report


def _write_json(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        print(f"\nresults -> {path}")


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _writing_out(handler):
    """The sub-command's function: run `handler`, then write its report to --out (errors: see rayapp.cli.main)."""
    def run(args: argparse.Namespace) -> int:
        _write_json(handler(args), args.out)
        return 0

    return run


def _common(parser: argparse.ArgumentParser, scorer_required: bool = True, scorer_help: str = "") -> None:
    parser.add_argument("--scorer", action="append", required=scorer_required,
                        help=f"[LABEL=]SPEC, repeatable; SPEC: {describe_names()} (any case), NAME:tiny, a saved "
                             "dir, an ImageReward .pt or a URI" + scorer_help)
    parser.add_argument("--out", help="write the full results (metrics, per-prompt scores) to this JSON file")
    parser.add_argument("--plot", help="write a PNG of the score distributions")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--tokenizer", help="tokenizer dir / hub name for reward models saved without one")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    """Add `eval table3` and `eval table1` to the `rayapp` parser."""
    ev = subparsers.add_parser("eval", help="benchmarks: preference accuracy + Recall/Filter@K, generator ranking")
    commands = ev.add_subparsers(dest="eval_command", required=True)

    t3 = commands.add_parser("table3", help="scorers vs human comparisons: accuracy, Recall@K, Filter@K")
    t3.add_argument("--data", required=True,
                    help="comparison Parquet shards (dir or file), or ImageRewardDB JSON (test.json) with --image-root")
    t3.add_argument("--image-root", help="directory the JSON generation paths are relative to")
    t3.add_argument("--ks", default="1,2,4", help="K values for Recall/Filter@K (default 1,2,4)")
    t3.add_argument("--ray", action="store_true",
                    help="score with the Ray Data batch job (actor pool) instead of in-process")
    t3.add_argument("--concurrency", type=int, default=1, help="--ray: actors per scorer")
    t3.add_argument("--num-gpus", type=float, default=0.0, help="--ray: GPUs per actor")
    t3.add_argument("--scores-dir", help="--ray: keep the scored Parquet here (resumable) instead of a temp dir")
    _common(t3)
    t3.set_defaults(func=_writing_out(run_table3))

    t1 = commands.add_parser("table1", help="rank generators: mean over prompts of mean image score")
    t1.add_argument("--prompts", required=True,
                    help="JSON list (or JSONL) of {id, prompt}, e.g. benchmark-prompts.json")
    t1.add_argument("--generations", action="append",
                    help="NAME=DIR, repeatable: a generator's images named <prompt id>_<k>.png")
    t1.add_argument("--generations-root", help="a directory with one sub-directory of images per generator")
    t1.add_argument("--human-ranking",
                    help="'paper' (the paper's 6 generators), a JSON file ({name: rank} or [best, ...]), "
                         "or a comma list best first")
    _common(t1)
    t1.set_defaults(func=_writing_out(run_table1))

    hps = commands.add_parser("hps", help="the HPS v2 benchmark: per style mean and std of 100 x score")
    hps.add_argument("--prompts-dir", required=True, help="folder with the benchmark's {style}.json prompt lists")
    hps.add_argument("--generations", required=True,
                     help="a generator's folder with {style}/{index:05d}.jpg images (anime, concept-art, ...)")
    hps.add_argument("--style", action="append", help="only these styles (default: every folder there)")
    _common(hps, False, "; default HPSv2.1")
    hps.set_defaults(func=_writing_out(run_hps))

    rw = commands.add_parser("rewards", help="generators x scorers: mean ± std and rank per scorer, with a plot")
    rw.add_argument("--prompts", required=True, help="JSON list (or JSONL) of {id, prompt}")
    rw.add_argument("--generations", action="append",
                    help="NAME=DIR, repeatable: a generator's images named <prompt id>_<k>.png")
    rw.add_argument("--generations-root", help="a directory with one sub-directory of images per generator")
    _common(rw, False, "; default every registered scorer")
    rw.set_defaults(func=_writing_out(run_rewards))
