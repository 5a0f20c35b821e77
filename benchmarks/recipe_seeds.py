"""Offline recipe across data orders: the RM stage of the main job, trained once per shuffle seed.

    python benchmarks/recipe_seeds.py                                  # seeds 1234,1,2
    python benchmarks/recipe_seeds.py --seeds 1234,7 --over '{"learning_rate": 5e-4}'   # a recipe variant

Makes the main job's synthetic comparison set once (what `jobs/offline_pipeline.py` trains on: the preset's
`synth_prompts`, `synth_per_prompt` and `seed`), then trains the preset (default `offline`) on that same set
for every seed with `RMTrainConfig.seed` set to it, and scores each exported model on the set's test split
as the job does (pairwise accuracy, model ties count as wrong). The seed orders the training pairs (the
pipeline's full shuffle and the per-epoch local shuffles) and also draws the initial weights, so a recipe
that holds here holds across data orders and initialisations alike. Seed 1234 is the main job's own run.

Prints a Markdown table (accuracy overall and per pair kind, best update, minutes of `train_reward_model`)
with the mean and the minimum, and writes it with every run's metrics to OUT/recipe_seeds.json. One local
Ray serves all runs; the first run's minutes include its start.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

KINDS = ("caption", "quality", "both")


def main_job_set(config, out: Path) -> Path:
    """The synthetic set the main job makes for this config (same generator arguments), written once."""
    from rayapp.data.synth import write_synthetic_set

    data = out / "data"
    manifest = data / "synth.json"
    wanted = {"seed": config.seed, "prompts": config.synth_prompts, "per_prompt": config.synth_per_prompt}
    if manifest.is_file() and all(json.loads(manifest.read_text()).get(k) == v for k, v in wanted.items()):
        return data
    write_synthetic_set(data, prompts=config.synth_prompts, per_prompt=config.synth_per_prompt,
                        seed=config.seed, overwrite=True, progress=False)
    return data


def run_seed(preset: str, overrides: dict, data: Path, seed: int, out: Path) -> dict:
    """Train one seed on the fixed set and score its export on the test split."""
    import rayapp
    from rayapp.rm import RMTrainConfig, train_reward_model
    from rayapp.rm.evaluation import pairwise_accuracy

    config = RMTrainConfig.from_preset(preset, **{**overrides, "data_dir": str(data), "seed": seed,
                                                  "output_dir": str(out / f"seed-{seed}")})
    started = time.time()
    result = train_reward_model(config)
    minutes = (time.time() - started) / 60
    scores = pairwise_accuracy(rayapp.load(result.model_dir), data / "test", tokenizer_dir=data / "tokenizer")
    row = {"seed": seed, "minutes": minutes, "best_step": result.metrics.get("best_step"),
           "total_steps": result.plan["total_steps"], **scores}
    print(f"seed {seed}: {json.dumps(row)}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    """Markdown table of the runs, then their mean and minimum."""
    head = ["seed", "held-out acc"] + [f"{k} acc" for k in KINDS] + ["best update", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cells(label, acc, per_kind, best, minutes):
        return "| " + " | ".join([label, acc, *per_kind, best, minutes]) + " |"

    for r in rows:
        lines.append(cells(str(r["seed"]), f"{r['accuracy']:.3f}", [f"{r.get(f'accuracy_{k}', float('nan')):.3f}"
                                                                    for k in KINDS],
                           f"{r['best_step']}/{r['total_steps']}", f"{r['minutes']:.1f}"))
    for label, reduce in (("mean", lambda v: sum(v) / len(v)), ("min", min)):
        lines.append(cells(f"**{label}**", f"{reduce([r['accuracy'] for r in rows]):.3f}",
                           [f"{reduce([r.get(f'accuracy_{k}', float('nan')) for r in rows]):.3f}" for k in KINDS],
                           "", f"{reduce([r['minutes'] for r in rows]):.1f}"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="offline", help="RMTrainConfig preset (default: %(default)s)")
    parser.add_argument("--seeds", default="1234,1,2", help="comma list of seeds (default: %(default)s)")
    parser.add_argument("--over", default="{}", help="JSON overrides of the preset's fields, e.g. "
                                                     "'{\"num_epochs\": 8}' (data_dir, seed, output_dir are set here)")
    parser.add_argument("--out", default="runs/recipe_seeds", help="data set, runs and results (default: %(default)s)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from rayapp.logs import setup_logging
    from rayapp.rm import RMTrainConfig

    setup_logging(False)
    overrides = json.loads(args.over)
    out = Path(args.out).resolve()
    data = main_job_set(RMTrainConfig.from_preset(args.preset, **overrides), out)
    rows = [run_seed(args.preset, overrides, data, int(s), out) for s in args.seeds.split(",")]
    text = table(rows)
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end"
    print(f"\npreset {args.preset}, overrides {json.dumps(overrides)}; {machine}; {time.strftime('%Y-%m-%d')}\n")
    print(text)
    (out / "recipe_seeds.json").write_text(json.dumps(
        {"preset": args.preset, "overrides": overrides, "machine": machine, "date": time.strftime("%Y-%m-%d"),
         "rows": rows, "table": text}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
