"""Labelled scorer specs for the evaluation tools: `[LABEL=]SPEC`, SPEC in the one scorer grammar of
`rayapp.scorers` (names in any case, `NAME:tiny`, paths, URIs).

Used by `rayapp eval --scorer`, `jobs/score_dataset.py --scorer` and the benchmarks. LABEL names the output
column (`score_<LABEL>`) and the table row; by default it is the scorer's canonical name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rayapp import scorers
from rayapp.scorers import ScorerRef


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer of an evaluation: its label (display name, column suffix) and what to load."""

    label: str
    ref: ScorerRef

    @property
    def scorer(self) -> str:
        """The canonical scorer name (rayapp.scorers)."""
        return self.ref.name

    @property
    def column(self) -> str:
        return "score_" + re.sub(r"[^0-9A-Za-z_]+", "_", self.label)

    def to_string(self) -> str:
        """The `LABEL=SPEC` text that parses back to this spec (sent to Ray actors)."""
        return f"{self.label}={self.ref.to_string()}"


def parse_spec(text: str) -> ScorerSpec:
    """Parse `[LABEL=]SPEC`; an unknown scorer name raises rayapp.scorers.UnknownScorerError."""
    from pathlib import Path

    from rayapp.data import storage

    text = text.strip()
    label = None
    # a URI may carry '=' in its query string, and a file name may hold one: neither has a label
    if "=" in text and not storage.is_uri(text) and not Path(text).exists():
        label, text = (part.strip() for part in text.split("=", 1))
    ref = scorers.parse_spec(text)
    return ScorerSpec(label or ref.name, ref)


def load_scorer(spec: ScorerSpec | str, *, device: Any = None, dtype: Any = None, tokenizer: Any = None,
                download_root: str | None = None):
    """Load the scorer a spec names; every scorer has `score`, `score_pairs` and `inference_rank`."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    return scorers.load(spec.ref, device=device, dtype=dtype, tokenizer=tokenizer, download_root=download_root)
