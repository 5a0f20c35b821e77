"""The reward model in pure PyTorch (transformers' BLIP encoders); nothing here imports Ray."""
from .config import RewardModelConfig, get_preset, list_presets
from .loading import available_models, create_model, load, load_config
from .modeling import ImageReward

__all__ = ["ImageReward", "RewardModelConfig", "available_models", "create_model", "get_preset", "list_presets", "load",
           "load_config"]
