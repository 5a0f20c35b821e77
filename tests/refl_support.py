"""What the ReFL job tests read of a finished run: its evaluation history and the 3-std reward criterion."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def run_history(out: Path) -> list[dict]:
    """The run's evaluation records (history.json): step, eval_reward, eval_rewards, ..."""
    return json.loads((out / "history.json").read_text())


def assert_reward_rose(out: Path, steps: int) -> float:
    """Mean held-out reward after - before > 3 std of the untuned samples' per-image rewards; returns the margin."""
    before, after = run_history(out)[0], run_history(out)[-1]
    assert before["step"] == 0 and after["step"] == steps
    margin = 3 * float(torch.tensor(before["eval_rewards"]).std())
    assert after["eval_reward"] - before["eval_reward"] > margin, (before, after, margin)
    return margin
