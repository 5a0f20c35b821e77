"""rayapp: ImageReward, the text-to-image human-preference reward model, on Ray.

    import rayapp
    model = rayapp.load("ImageReward-v1.0")          # or a local ImageReward.pt / saved directory / owner/repo
    model.score("a red circle", ["a.png", "b.png"])   # -> [0.31, -1.2]
    ranking, rewards = model.inference_rank("a red circle", ["a.png", "b.png"])
    model.push_to_hub("me/my-reward-model")          # weights, config, tokenizer and a model card

Attributes are imported on first use so that `import rayapp` stays light (no torch, no Ray).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": "rayapp.model.loading",
    "available_models": "rayapp.model.loading",
    "create_model": "rayapp.model.loading",
    "ImageReward": "rayapp.model.modeling",
    "RewardModelConfig": "rayapp.model.config",
    "load_score": "rayapp.scorers",
    "push_to_hub": "rayapp.model.hub",
}
__all__ = sorted(_LAZY)  # noqa: PLE0605  (derived, so it cannot drift from _LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rayapp' has no attribute {name!r}")
