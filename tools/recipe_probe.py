"""Tiny-recipe probe: train the tiny reward model in one plain PyTorch process (no Ray) and report held-out
pairwise accuracy per pair kind and, for caption pairs, per wrong attribute of the worse image.

    python tools/recipe_probe.py --data runs/rm/data --lr 1e-3 --warmup 150 --epochs 6
    python tools/recipe_probe.py --data DIR --over '{"vision_num_layers": 5}'    # an architecture variant

DIR is a `rayapp data synth` directory. This is how the synthetic set's default attributes (count is not
learned) and the "one plain process" pairs/s figure in the README were measured. Its data order (a fresh
permutation every epoch) is not the Ray pipeline's: the offline recipe itself is measured on Ray Train +
DeepSpeed over several shuffle seeds by benchmarks/recipe_seeds.py.
Same model, loss (-log sigmoid), Adam, clipping (1.0) and warm-up + cosine schedule as the train loop.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rayapp
from rayapp.data import synth
from rayapp.data.pairs import expand_pairs
from rayapp.data.shards import iter_comparisons
from rayapp.rm.task import pair_loss
from rayapp.runtime.engine import lr_lambda


def load_split(model, split_dir: Path):
    """Every image of the split preprocessed once, the prompts tokenised, pairs as (better, worse, prompt, kind, id)."""
    images, prompts, pairs = [], [], []
    for record in iter_comparisons(split_dir):
        base, prompt_index = len(images), len(prompts)
        images.extend(record["images"])
        prompts.append(record["prompt"])
        for pair in expand_pairs(record):
            pairs.append((base + pair["better"], base + pair["worse"], prompt_index, pair["pair_kind"], pair))
    pixels = torch.cat([model.preprocess(images[i:i + 256]) for i in range(0, len(images), 256)])
    ids, mask = model.tokenize(prompts)
    return pixels, ids, mask, pairs


def rewards(model, split, indices):
    pixels, ids, mask, pairs = split
    better = torch.tensor([pairs[i][0] for i in indices])
    worse = torch.tensor([pairs[i][1] for i in indices])
    prompt = torch.tensor([pairs[i][2] for i in indices])
    raw = model(torch.cat([pixels[better], pixels[worse]]), ids[prompt].repeat(2, 1), mask[prompt].repeat(2, 1))
    return raw[:len(indices)], raw[len(indices):]


def correct_flags(model, split) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(split[3]), 128):
            r_b, r_w = rewards(model, split, list(range(start, min(start + 128, len(split[3])))))
            out.append((r_b > r_w).numpy())
    model.train()
    return np.concatenate(out)


def accuracy_by_kind(flags: np.ndarray, pairs) -> dict:
    kinds = np.array([p[3] for p in pairs])
    return {"all": round(float(flags.mean()), 4),
            **{str(k): round(float(flags[kinds == k].mean()), 4) for k in sorted(set(kinds))}}


def wrong_attributes(data_dir: Path, split: str) -> dict[str, list[str]]:
    """Regenerate the split's records and name the caption attributes each shown image gets wrong."""
    manifest = json.loads((data_dir / "synth.json").read_text())
    start = {"train": 0, "val": manifest["rows"]["train"],
             "test": manifest["rows"]["train"] + manifest["rows"]["val"]}[split]
    out = {}
    for index in range(start, start + manifest["rows"][split]):
        shown = []
        original = synth.corrupt

        def recording(scene, n_wrong, attributes, rng, _orig=original, _shown=shown):
            _shown.append(_orig(scene, n_wrong, attributes, rng))
            return _shown[-1]

        synth.corrupt = recording
        try:
            record = synth.make_record(index, seed=manifest["seed"], per_prompt=manifest["per_prompt"],
                                       image_size=manifest["image_size"], attributes=tuple(manifest["attributes"]))
        finally:
            synth.corrupt = original
        words, queue = record["prompt"].split(), iter(shown)
        for k, f in enumerate(record["faithfulness"]):
            scene = next(queue) if f < 2 else None
            wrong = [] if scene is None else [name for name, ok in (
                ("count", synth.COUNT_WORDS[scene.count] == words[0]), ("size", scene.size == words[1]),
                ("colour", scene.colour == words[2])) if not ok]
            out[f"{record['id']}#{k}"] = wrong
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a `rayapp data synth` directory")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=150, help="warm-up updates")
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--batch", type=int, default=32, help="pairs per update")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: two probes share 2 cores)")
    parser.add_argument("--over", default="{}",
                        help="JSON overrides of the tiny preset, e.g. '{\"text_num_layers\": 2}'")
    parser.add_argument("--save", default=None, help="save_pretrained directory for the trained model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)

    model = rayapp.create_model("tiny", tokenizer=str(data / "tokenizer"), seed=args.seed, **json.loads(args.over))
    train, test = load_split(model, data / "train"), load_split(model, data / "test")
    steps_per_epoch = len(train[3]) // args.batch
    total = int(args.epochs * steps_per_epoch)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, args.warmup))
    print(f"params {sum(p.numel() for p in model.parameters())}, train pairs {len(train[3])}, "
          f"test pairs {len(test[3])}, {total} updates", flush=True)
    rng, step, started, losses = np.random.default_rng(args.seed), 0, time.time(), []
    model.train()
    while step < total:
        order = rng.permutation(len(train[3]))
        for s in range(min(steps_per_epoch, total - step)):
            loss = pair_loss(*rewards(model, train, order[s * args.batch:(s + 1) * args.batch].tolist()))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
        elapsed = time.time() - started
        print(f"update {step}/{total}  train loss {np.mean(losses[-steps_per_epoch:]):.4f}  "
              f"test {accuracy_by_kind(correct_flags(model, test), test[3])}  "
              f"{step * args.batch / elapsed:.0f} pairs/s (incl. evaluation)", flush=True)

    flags = correct_flags(model, test)
    print("final held-out accuracy by pair kind:", accuracy_by_kind(flags, test[3]))
    wrong = wrong_attributes(data, "test")
    tally = collections.defaultdict(lambda: [0, 0])
    for ok, (_, _, _, kind, pair) in zip(flags, test[3]):
        if kind == "caption":
            key = "+".join(wrong[f"{pair['id']}#{pair['worse']}"]) or "none"
            tally[key][0] += int(ok)
            tally[key][1] += 1
    print("caption pairs by what the worse image gets wrong:")
    for key, (right, n) in sorted(tally.items()):
        print(f"  {key:20s} {right}/{n} = {right / n:.2f}")
    if args.save:
        model.save_pretrained(args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
