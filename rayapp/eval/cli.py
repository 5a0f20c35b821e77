"""`rayapp eval`: the paper's benchmarks. Heavy imports (torch, ray, matplotlib) happen inside the handlers.

    rayapp eval table3 --data DIR --scorer ImageReward --scorer CLIP --out table3.json
    rayapp eval table1 --prompts benchmark-prompts.json --generations-root generations/ --scorer ImageReward \
        --human-ranking paper --out table1.json --plot table1.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -------------------------------------------------------------------------------------- formatting
def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else ":---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _published_key(label: str) -> str | None:
    from rayapp.eval.metrics import PUBLISHED_TABLE3_ACCURACY

    for key in PUBLISHED_TABLE3_ACCURACY:
        if label.lower().startswith(key.lower()):
            return key
    return None


# -------------------------------------------------------------------------------------- Table 3
def _load_records(args) -> list[dict]:
    """Comparison records {id, prompt, images (bytes or paths), ranking} from Parquet shards or JSON."""
    path = Path(args.data)
    if path.suffix.lower() in (".json", ".jsonl"):
        from rayapp.data.formats import load_json_records

        root = Path(args.image_root) if args.image_root else path.parent
        return [{"id": str(r["id"]), "prompt": r["prompt"], "ranking": list(r["ranking"]),
                 "images": [str(root / g) for g in r["generations"]]} for r in load_json_records(path)]
    from rayapp.data.shards import iter_comparisons

    return [{"id": r["id"], "prompt": r["prompt"], "ranking": list(r["ranking"]), "images": r["images"]}
            for r in iter_comparisons(path)]


def _score_records_local(spec, records: list[dict], args) -> list[list[float]]:
    from tqdm.auto import tqdm

    from rayapp.eval.scorers import load_scorer

    scorer = load_scorer(spec, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    return [scorer.score(r["prompt"], list(r["images"]), batch_size=args.batch_size)
            for r in tqdm(records, desc=f"{spec.label}", unit="prompt", disable=args.quiet)]


def _score_records_ray(specs, args) -> dict[str, dict[str, list[float]]]:
    """Score the comparison shards with the Ray Data job; returns label -> id -> scores."""
    import tempfile

    from rayapp.eval.batch_scoring import ScoreJobConfig, read_scored, run_score_job

    out = args.scores_dir or tempfile.mkdtemp(prefix="rayapp-table3-")
    config = ScoreJobConfig(input=args.data, output=out, scorers=[s.to_string() for s in specs],
                            input_format="comparison", key_column="id", batch_size=args.batch_size,
                            concurrency=args.concurrency, num_gpus=args.num_gpus, dtype=args.dtype,
                            tokenizer=args.tokenizer, drop_images=True, resume=True, progress=not args.quiet)
    result = run_score_job(config)
    print(result.summary(), file=sys.stderr)
    table = read_scored(out, columns=["id", *[s.column for s in specs]])
    ids = table["id"].to_pylist()
    return {s.label: dict(zip(ids, table[s.column].to_pylist())) for s in specs}


def run_table3(args) -> dict:
    from rayapp.eval.metrics import (
        PUBLISHED_PEER_ACCURACY,
        PUBLISHED_RECALL_FILTER,
        PUBLISHED_TABLE3_ACCURACY,
        preference_accuracy,
        recall_filter_at_k,
    )
    from rayapp.eval.scorers import parse_spec

    specs = [parse_spec(s) for s in args.scorer]
    ks = [int(k) for k in args.ks.split(",")]
    records = _load_records(args)
    if not records:
        raise ValueError(f"no comparison records in {args.data}")
    if args.ray:
        if Path(args.data).suffix.lower() in (".json", ".jsonl"):
            raise ValueError("--ray reads Parquet shards; convert JSON first with `rayapp data convert`")
        by_label = _score_records_ray(specs, args)
        scores = {s.label: [by_label[s.label][r["id"]] for r in records] for s in specs}
    else:
        scores = {s.label: _score_records_local(s, records, args) for s in specs}
    results = {}
    for spec in specs:
        pairs = [(r["ranking"], sc) for r, sc in zip(records, scores[spec.label])]
        acc = preference_accuracy(pairs)
        rf = recall_filter_at_k(pairs, ks)
        published = _published_key(spec.label)
        results[spec.label] = {
            "scorer": spec.to_string(),
            "accuracy": acc.to_dict(),
            "recall_filter": rf.to_dict(),
            "published": {
                "accuracy": PUBLISHED_TABLE3_ACCURACY.get(published),
                **PUBLISHED_RECALL_FILTER.get(published, {}),
            } if published else None,
        }
    report = {
        "mode": "table3", "data": str(args.data), "prompts": len(records),
        "images": sum(len(r["images"]) for r in records), "ks": ks, "results": results,
        "published_note": "paper values (%): ImageRewardDB test split (466 prompts, 6,399 pairs) for accuracy; "
                          "an unreleased 371-prompt x 8-image set for Recall/Filter@K",
        "published_peers_accuracy": PUBLISHED_PEER_ACCURACY,
        "scores": {label: {r["id"]: s for r, s in zip(records, sc)} for label, sc in scores.items()},
    }
    header = ["Scorer", "Acc (micro) %", "Acc (per-prompt) %", "pairs"] + \
             [f"R@{k} %" for k in ks] + [f"F@{k} %" for k in ks] + ["published Acc %"]
    rows = []
    for label, res in results.items():
        acc, rf = res["accuracy"], res["recall_filter"]
        pub = res["published"]["accuracy"] if res["published"] else None
        rows.append([label, _pct(acc["micro"]), _pct(acc["per_prompt"]), str(acc["pairs"])]
                    + [_pct(rf["recall"][str(k)]) for k in ks] + [_pct(rf["filter"][str(k)]) for k in ks]
                    + [f"{pub:.2f}" if pub is not None else "-"])
    text = markdown_table(header, rows)
    pub_rows = [[name, f"{acc:.2f}"]
                + [f"{PUBLISHED_RECALL_FILTER[name]['recall'][k]:.2f}" if name in PUBLISHED_RECALL_FILTER and k in (1, 2, 4) else "-" for k in ks]
                + [f"{PUBLISHED_RECALL_FILTER[name]['filter'][k]:.2f}" if name in PUBLISHED_RECALL_FILTER and k in (1, 2, 4) else "-" for k in ks]
                for name, acc in PUBLISHED_TABLE3_ACCURACY.items()]
    published_text = markdown_table(["Published (paper)", "Acc %"] + [f"R@{k} %" for k in ks] + [f"F@{k} %" for k in ks],
                                    pub_rows)
    print(f"Table 3 on {args.data}: {len(records)} prompts, {report['images']} images\n")
    print(text)
    standard = len(records) == 466 and report["images"] == 2720
    report["standard_test_split"] = standard
    print("\nFor reference, " + report["published_note"] + ":" + (
        "" if standard else " (this set is not the 466-prompt ImageRewardDB test split, so they are not comparable)")
        + "\n")
    print(published_text)
    if args.plot:
        _plot_table3(records, scores, args.plot)
        print(f"\nplot -> {args.plot}")
    return report


def _plot_table3(records, scores: dict[str, list[list[float]]], path: str) -> None:
    """Per scorer: score histograms of the human-best vs the human-worst image of each prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4.5 * len(scores), 3.5), squeeze=False)
    for ax, (label, per_record) in zip(axes[0], scores.items()):
        best, worst = [], []
        for record, values in zip(records, per_record):
            ranking = record["ranking"]
            if min(ranking) == max(ranking):
                continue
            best += [v for v, r in zip(values, ranking) if r == min(ranking)]
            worst += [v for v, r in zip(values, ranking) if r == max(ranking)]
        ax.hist([best, worst], bins=20, label=["human best", "human worst"], alpha=0.8)
        ax.set_title(label)
        ax.set_xlabel("score")
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------- Table 1
def load_prompt_list(path: str | Path) -> list[dict]:
    """benchmark-prompts.json style: a JSON list (or JSONL) of {id, prompt}."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    items = [json.loads(l) for l in text.splitlines() if l.strip()] if path.suffix == ".jsonl" else json.loads(text)
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item or not item.get("prompt"):
            raise ValueError(f"{path}: item {i} needs 'id' and 'prompt'")
    return [{"id": str(item["id"]), "prompt": item["prompt"]} for item in items]


def find_generations(folder: Path, prompt_id: str) -> list[Path]:
    """Images of one prompt in a model's folder: `<id>_<k>.<ext>` (the reference layout), sorted by k."""
    found = []
    for path in folder.iterdir():
        if path.suffix.lower() in IMAGE_SUFFIXES and path.stem.rpartition("_")[0] == prompt_id:
            tail = path.stem.rpartition("_")[2]
            found.append((int(tail) if tail.isdigit() else 10**9, path.name, path))
    return [p for _, _, p in sorted(found)]


def _generation_dirs(args) -> dict[str, Path]:
    dirs: dict[str, Path] = {}
    if args.generations_root:
        root = Path(args.generations_root)
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            dirs[sub.name] = sub
    for item in args.generations or []:
        name, sep, folder = item.partition("=")
        if not sep:
            folder, name = name, Path(name).name
        dirs[name] = Path(folder)
    if not dirs:
        raise ValueError("give --generations NAME=DIR (repeatable) or --generations-root DIR")
    for name, folder in dirs.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"generations of {name!r}: no directory {folder}")
    return dirs


def _human_ranking(arg: str | None, models: list[str]) -> dict[str, float] | None:
    from rayapp.eval.metrics import PUBLISHED_TABLE1_HUMAN_RANKING

    if not arg:
        return None
    if arg == "paper":
        return dict(PUBLISHED_TABLE1_HUMAN_RANKING)
    if Path(arg).is_file():
        data = json.loads(Path(arg).read_text())
        if isinstance(data, list):
            return {name: i + 1 for i, name in enumerate(data)}
        return {str(k): float(v) for k, v in data.items()}
    return {name.strip(): i + 1 for i, name in enumerate(arg.split(",")) if name.strip()}


def run_table1(args) -> dict:
    from tqdm.auto import tqdm

    from rayapp.eval.metrics import PUBLISHED_TABLE1, PUBLISHED_TABLE1_SPEARMAN, table1
    from rayapp.eval.scorers import load_scorer, parse_spec

    prompts = load_prompt_list(args.prompts)
    dirs = _generation_dirs(args)
    specs = [parse_spec(s) for s in args.scorer]
    human = _human_ranking(args.human_ranking, list(dirs))
    report = {"mode": "table1", "prompts": len(prompts), "models": list(dirs), "human_ranking": human, "results": {}}
    missing: dict[str, int] = {}
    plot_data: dict[str, dict[str, list[float]]] = {}
    for spec in specs:
        scorer = load_scorer(spec, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
        per_model: dict[str, dict[str, list[float]]] = {}
        for model, folder in dirs.items():
            per_model[model] = {}
            for item in tqdm(prompts, desc=f"{spec.label} / {model}", unit="prompt", disable=args.quiet):
                images = find_generations(folder, item["id"])
                if not images:
                    missing[model] = missing.get(model, 0) + 1
                    continue
                per_model[model][item["id"]] = scorer.score(item["prompt"], images, batch_size=args.batch_size)
        result = table1(per_model, human)
        plot_data[spec.label] = {m: [s for v in per.values() for s in v] for m, per in per_model.items()}
        report["results"][spec.label] = {**result.to_dict(), "per_prompt": per_model}
    for model, count in missing.items():
        print(f"warning: {model}: no images for {count // max(1, len(specs))} of {len(prompts)} prompts",
              file=sys.stderr)
    header = ["Model"] + [f"{label} score" for label in report["results"]] + [f"{label} rank" for label in report["results"]]
    has_published = any(m in PUBLISHED_TABLE1 for m in dirs)
    if has_published:
        header.append("published ImageReward score")
    if human:
        header.append("human rank")
    rows = []
    for model in dirs:
        row = [model] + [_num(res["scores"].get(model)) for res in report["results"].values()]
        row += [_num(res["ranking"].get(model), 1) for res in report["results"].values()]
        if has_published:
            row.append(_num(PUBLISHED_TABLE1.get(model)))
        if human:
            row.append(_num(human.get(model), 0) if model in human else "-")
        rows.append(row)
    print(f"Table 1: {len(prompts)} prompts, {len(dirs)} generators\n")
    print(markdown_table(header, rows))
    if human:
        print()
        for label, res in report["results"].items():
            print(f"Spearman rho ({label} vs human ranking, {len(res['spearman_models'] or [])} models): "
                  f"{_num(res['spearman'], 3)}")
        print("Published Spearman rho vs human ranking: "
              + ", ".join(f"{k} {v:.2f}" for k, v in PUBLISHED_TABLE1_SPEARMAN.items()))
    if has_published:
        print("Published ImageReward scores (paper Table 1): "
              + ", ".join(f"{k} {v:+.4f}" for k, v in PUBLISHED_TABLE1.items()))
    if args.plot:
        plot_distributions(plot_data, args.plot)
        print(f"\nplot -> {args.plot}")
    return report


def plot_distributions(data: dict[str, dict[str, list[float]]], path: str) -> None:
    """Violin plot of score distributions per generator, one panel per scorer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(max(4.0, 1.4 * max(len(v) for v in data.values())) * len(data), 4),
                             squeeze=False)
    for ax, (label, per_model) in zip(axes[0], data.items()):
        names = [m for m, v in per_model.items() if v]
        ax.violinplot([per_model[m] for m in names], showmeans=True, showextrema=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_ylabel(f"{label} score")
        ax.set_title(f"{label} score per generator")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------- wiring
def _write_json(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        print(f"\nresults -> {path}")


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _run(handler):
    def run(args) -> int:
        try:
            report = handler(args)
        except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        _write_json(report, args.out)
        return 0

    return run


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scorer", action="append", required=True,
                        help="[LABEL=]SPEC, repeatable: ImageReward, CLIP, BLIP, Aesthetic, NAME:tiny, or a saved dir")
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
    t3.add_argument("--ray", action="store_true", help="score with the Ray Data batch job (actor pool) instead of in-process")
    t3.add_argument("--concurrency", type=int, default=1, help="--ray: actors per scorer")
    t3.add_argument("--num-gpus", type=float, default=0.0, help="--ray: GPUs per actor")
    t3.add_argument("--scores-dir", help="--ray: keep the scored Parquet here (resumable) instead of a temp dir")
    _common(t3)
    t3.set_defaults(func=_run(run_table3))

    t1 = commands.add_parser("table1", help="rank generators: mean over prompts of mean image score")
    t1.add_argument("--prompts", required=True, help="JSON list (or JSONL) of {id, prompt}, e.g. benchmark-prompts.json")
    t1.add_argument("--generations", action="append",
                    help="NAME=DIR, repeatable: a generator's images named <prompt id>_<k>.png")
    t1.add_argument("--generations-root", help="a directory with one sub-directory of images per generator")
    t1.add_argument("--human-ranking",
                    help="'paper' (the paper's 6 generators), a JSON file ({name: rank} or [best, ...]), "
                         "or a comma list best first")
    _common(t1)
    t1.set_defaults(func=_run(run_table1))
