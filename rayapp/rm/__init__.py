"""Reward-model training on Ray Train + DeepSpeed: config, its task in the shared loop, driver, evaluation.

    from rayapp.rm import RMTrainConfig, train_reward_model
    result = train_reward_model(RMTrainConfig.from_preset("offline", output_dir="runs/rm"))
"""
from __future__ import annotations

from .config import RMTrainConfig
from .driver import RMTrainResult, train_reward_model

__all__ = ["RMTrainConfig", "RMTrainResult", "train_reward_model"]
