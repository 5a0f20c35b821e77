"""Scorer specs: one string names any scorer the evaluation tools can load (ImageReward or a baseline).

Spec grammar (used by `rayapp eval --scorer`, `jobs/score_dataset.py --scorer`, the benchmark):
    [LABEL=]SOURCE
    SOURCE = "ImageReward" | "ImageReward-v1.0"   the published model (hub THUDM/ImageReward)
           | "CLIP" | "BLIP" | "Aesthetic"         a baseline with its real weights
           | "CLIP:tiny" | "BLIP:tiny" | ...       a baseline with tiny random weights (tests, demos)
           | PATH                                  a `save_pretrained` dir of ImageReward or of a baseline
                                                   (a baseline dir holds scorer.json), or an official .pt
LABEL names the output column (`score_<LABEL>`) and the table row; by default it is "ImageReward" for
reward models and the baseline's name for baselines.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayapp.eval.baselines import available_scores, match_baseline, saved_baseline

IMAGEREWARD_NAMES = ("ImageReward", "ImageReward-v1.0")


@dataclass(frozen=True)
class ScorerSpec:
    label: str  # display name and column suffix
    kind: str  # "imagereward" or a baseline name (rayapp.eval.baselines.BASELINES)
    source: str  # hub name, path, or "tiny"

    @property
    def column(self) -> str:
        return "score_" + re.sub(r"[^0-9A-Za-z_]+", "_", self.label)

    def to_string(self) -> str:
        """The `LABEL=SOURCE` text that parses back to this spec (sent to Ray actors)."""
        if self.kind == "imagereward":
            source = self.source
        else:
            source = {"tiny": f"{self.kind}:tiny", "hub": self.kind}.get(self.source, self.source)
        return f"{self.label}={source}"


def parse_spec(text: str) -> ScorerSpec:
    """Parse `[LABEL=]SOURCE` (see the module docstring)."""
    text = text.strip()
    label = None
    if "=" in text and not Path(text).exists():
        label, text = (part.strip() for part in text.split("=", 1))
    if not text:
        raise ValueError("empty scorer spec")
    name, _, variant = text.partition(":")
    baseline = match_baseline(name)
    if baseline and variant in ("", "tiny"):
        return ScorerSpec(label or baseline, baseline, variant or "hub")
    if text in IMAGEREWARD_NAMES:
        return ScorerSpec(label or "ImageReward", "imagereward", "ImageReward-v1.0")
    path = Path(text).expanduser()
    kind = saved_baseline(path) if path.is_dir() else None
    if kind is not None:
        return ScorerSpec(label or kind, kind, os.fspath(path))
    if path.exists():
        return ScorerSpec(label or "ImageReward", "imagereward", os.fspath(path))
    raise ValueError(
        f"unknown scorer {text!r}: use ImageReward, {', '.join(available_scores())}, NAME:tiny, or an existing path"
    )


def load_scorer(spec: ScorerSpec | str, *, device: Any = None, dtype: Any = None, tokenizer: Any = None,
                download_root: str | None = None):
    """Load the scorer a spec names; every scorer has `score`, `score_pairs` and `inference_rank`."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec.kind == "imagereward":
        from rayapp.model.loading import load

        return load(spec.source, device=device, dtype=dtype, tokenizer=tokenizer, download_root=download_root)
    from rayapp.eval.baselines import load_score

    if spec.source == "tiny":
        return load_score(spec.kind, config="tiny", device=device, dtype=dtype, tokenizer=tokenizer)
    if spec.source == "hub":
        return load_score(spec.kind, device=device, dtype=dtype, tokenizer=tokenizer, download_root=download_root)
    return load_score(spec.kind, spec.source, device=device, dtype=dtype)
