"""Benchmark inputs on disk: comparison records, prompt lists, generation folders, human rankings."""
from __future__ import annotations

import json
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_json_data(data: str | Path) -> bool:
    """Whether a `--data` path is ImageRewardDB-style JSON (else Parquet comparison shards)."""
    return Path(data).suffix.lower() in (".json", ".jsonl")


def load_comparison_records(data: str | Path, image_root: str | Path | None = None) -> list[dict]:
    """Comparison records {id, prompt, images (bytes or paths), ranking} from Parquet shards or JSON.

    JSON generation paths are relative to `image_root` (default: the JSON file's folder).
    """
    path = Path(data)
    if is_json_data(path):
        from rayapp.data.formats import load_json_records

        root = Path(image_root) if image_root else path.parent
        records = [{"id": str(r["id"]), "prompt": r["prompt"], "ranking": list(r["ranking"]),
                    "images": [str(root / g) for g in r["generations"]]} for r in load_json_records(path)]
    else:
        from rayapp.data.shards import iter_comparisons

        records = [{"id": r["id"], "prompt": r["prompt"], "ranking": list(r["ranking"]), "images": r["images"]}
                   for r in iter_comparisons(path)]
    if not records:
        raise ValueError(f"no comparison records in {data}")
    return records


def load_prompt_list(path: str | Path) -> list[dict]:
    """benchmark-prompts.json style: a JSON list (or JSONL) of {id, prompt}."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        items = json.loads(text)
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


def generation_dirs(generations_root: str | Path | None, generations: list[str] | None) -> dict[str, Path]:
    """Generator name -> image folder, from a root of one sub-folder per generator and/or NAME=DIR items."""
    dirs: dict[str, Path] = {}
    if generations_root:
        for sub in sorted(p for p in Path(generations_root).iterdir() if p.is_dir()):
            dirs[sub.name] = sub
    for item in generations or []:
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


def read_human_ranking(arg: str | None) -> dict[str, float] | None:
    """Generator -> human rank (1 = best) from 'paper', a JSON file ({name: rank} or [best, ...]) or 'a,b,c'."""
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
