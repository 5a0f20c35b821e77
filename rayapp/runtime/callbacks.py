"""Hooks into a running training loop: callables the Python API passes in, called on every rank.

Uses: another tracker than the built-in ones (the "after" event carries the update's train numbers), progress
sinks, and the fault tests (a callback that kills a worker at a chosen update). They travel to the workers with
the loop's plan (cloudpickle), so they must be picklable.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UpdateEvent:
    """One optimizer update of one rank: `when` is "before" (about to run `step`) or "after" (it finished)."""

    when: str
    step: int  # 0-based index of the update
    rank: int
    storage_path: str  # the run's Ray Train storage (a place callbacks may keep state across restarts)
    run_name: str
    metrics: Mapping[str, float] = field(default_factory=dict)  # "after": this rank's train_* numbers of the update


UpdateCallback = Callable[[UpdateEvent], None]


def notify(callbacks: Sequence[UpdateCallback], when: str, step: int, rank: int, storage_path: str,
           run_name: str, metrics: Mapping[str, float] | None = None) -> None:
    """Call every callback with one event."""
    if not callbacks:
        return
    event = UpdateEvent(when, step, rank, storage_path, run_name, dict(metrics or {}))
    for callback in callbacks:
        callback(event)
