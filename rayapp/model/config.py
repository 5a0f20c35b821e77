"""Architectures as data: `RewardModelConfig` and the named presets in `presets/*.json`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

PRESET_DIR = Path(__file__).parent / "presets"

# The reference's fixed output normalisation (SPEC 1): reward = (head_out - mean) / std.
REFERENCE_REWARD_MEAN = 0.16717362830052426
REFERENCE_REWARD_STD = 1.0333394966054072


@dataclass
class RewardModelConfig:
    """Every size of the scorer; units in the field comments."""

    image_size: int = 224  # pixels, square input side after resize + center crop
    patch_size: int = 16  # pixels per ViT patch side
    vision_hidden_size: int = 1024  # ViT width; also the cross-attention memory width
    vision_num_layers: int = 24  # ViT blocks
    vision_num_heads: int = 16  # ViT attention heads
    vision_intermediate_size: int = 4096  # ViT MLP width
    vision_layer_norm_eps: float = 1e-6
    text_hidden_size: int = 768  # BERT width; the head's input size
    text_num_layers: int = 12  # BERT layers, each self-attn -> cross-attn -> FFN
    text_num_heads: int = 12
    text_intermediate_size: int = 3072  # BERT FFN width
    text_dropout: float = 0.1  # hidden and attention dropout in the text encoder (training only)
    text_max_positions: int = 512  # learned position embeddings
    vocab_size: int = 30524  # bert-base-uncased 30522 + [DEC] + [ENC]
    max_length: int = 35  # tokens per prompt after padding / truncation
    head_hidden_sizes: list[int] = field(default_factory=lambda: [1024, 128, 64, 16])  # head Linear widths
    # dropout after all but the last hidden Linear
    head_dropouts: list[float] = field(default_factory=lambda: [0.2, 0.2, 0.1])
    reward_mean: float = REFERENCE_REWARD_MEAN  # raw head output mean, subtracted at inference
    reward_std: float = REFERENCE_REWARD_STD  # raw head output std, divided at inference
    tokenizer: str | None = "bert-base-uncased"  # hub name or dir; None = must be given / saved alongside

    @property
    def num_image_tokens(self) -> int:
        """Patches plus the CLS token (197 for ViT-L/16 at 224 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RewardModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown RewardModelConfig fields: {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RewardModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def list_presets() -> list[str]:
    """Names of the built-in architectures."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def get_preset(name: str, **overrides) -> RewardModelConfig:
    """The named preset, with optional field overrides."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    data = json.loads(path.read_text())
    data.update(overrides)
    return RewardModelConfig.from_dict(data)
