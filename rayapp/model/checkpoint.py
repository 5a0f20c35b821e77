"""Checkpoint formats: the official ImageReward.pt (+ med_config.json) and our safetensors directory.

Official key names map one-to-one onto ours; anything missing, unexpected or mis-shaped is an error
that names the key (the reference's `strict=False` silently hid such problems). The weights readers and
the strict loader here are the only ones in rayapp; the baseline scorers use them too.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .config import REFERENCE_REWARD_MEAN, REFERENCE_REWARD_STD, RewardModelConfig

OFFICIAL_WEIGHTS = "ImageReward.pt"
OFFICIAL_MED_CONFIG = "med_config.json"
PRETRAINED_CONFIG = "config.json"
PRETRAINED_WEIGHTS = "model.safetensors"

# Present in the official file but unused by the reward model.
IGNORED_OFFICIAL_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|\.position_ids$")

# Vision-block sub-module renames, reference (timm-style BLIP ViT) <-> transformers BlipVisionModel.
_BLOCK_RENAMES = [
    ("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
    ("attn.proj", "self_attn.projection"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
]
_VISION_RENAMES = [
    ("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embedding.bias"),
    ("norm.weight", "post_layernorm.weight"), ("norm.bias", "post_layernorm.bias"),
]


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not fit the architecture; the message names them."""


def official_to_ours(key: str) -> str | None:
    """Our parameter name for an official key, or None for an official key we do not know."""
    if key.startswith("mlp.layers."):
        return "head.layers." + key[len("mlp.layers."):]
    if key.startswith("blip.text_encoder."):
        return "text." + key[len("blip.text_encoder."):]
    if key.startswith("blip.visual_encoder."):
        rest = key[len("blip.visual_encoder."):]
        for official, ours in _VISION_RENAMES:
            if rest == official:
                return "vision." + ours
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
        if match:
            for official, ours in _BLOCK_RENAMES:
                if match.group(2) == official:
                    return f"vision.encoder.layers.{match.group(1)}.{ours}.{match.group(3)}"
    return None


def internal_to_official(key: str) -> str:
    """The official name of one of our parameters."""
    if key.startswith("head.layers."):
        return "mlp.layers." + key[len("head.layers."):]
    if key.startswith("text."):
        return "blip.text_encoder." + key[len("text."):]
    if key.startswith("vision."):
        rest = key[len("vision."):]
        for official, ours in _VISION_RENAMES:
            if rest == ours:
                return "blip.visual_encoder." + official
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
        if match:
            for official, ours in _BLOCK_RENAMES:
                if match.group(2) == ours:
                    return f"blip.visual_encoder.blocks.{match.group(1)}.{official}.{match.group(3)}"
    raise KeyError(f"no official name for parameter {key!r}")


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                      names: dict[str, str] | None = None) -> None:
    """Load `state` (our key names) into `model`, failing with every missing / unexpected / mis-shaped key.

    `names` maps our keys back to the names used in the file, so errors quote what the user has.
    """
    names = names or {}
    expected = model.state_dict()
    missing = sorted(names.get(k, k) for k in expected if k not in state)
    unexpected = sorted(names.get(k, k) for k in state if k not in expected)
    mismatched = [
        f"{names.get(k, k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
    if problems:
        raise CheckpointError(f"{source} does not fit the architecture: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


def read_state_dict(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: `.safetensors`, or torch.load(weights_only=True) (never arbitrary objects).

    A training checkpoint's `{"model": ...}` or `{"state_dict": ...}` wrapper is unwrapped (BLIP's
    model_large.pth has one); every value must then be a tensor. `mmap`: map the file instead of reading
    it (for shapes alone; a torch file saved in the legacy non-zip format cannot be mapped and is read).
    """
    source = os.fspath(path)
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(source)
    try:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            state = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle refusing a non-tensor object, truncated file, ...
        raise CheckpointError(f"{source}: not a loadable weights-only checkpoint: {err}") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: expected a state_dict of tensors")
    return state


# ---- official format --------------------------------------------------------------------------


def config_from_official(state: dict[str, torch.Tensor], med_config: dict) -> RewardModelConfig:
    """Derive the architecture from med_config.json (text) and the tensor shapes (vision, head)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"official checkpoint lacks {key!r}")
        return tuple(state[key].shape)

    vision_width = shape("blip.visual_encoder.cls_token")[-1]
    patch = shape("blip.visual_encoder.patch_embed.proj.weight")[-1]
    num_patches = shape("blip.visual_encoder.pos_embed")[1] - 1
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k))}
    head_linears = sorted(
        int(m.group(1)) for k in state if (m := re.fullmatch(r"mlp\.layers\.(\d+)\.weight", k))
    )
    if not head_linears:
        raise CheckpointError("official checkpoint has no mlp.layers.*.weight")
    head_sizes = [shape(f"mlp.layers.{i}.weight")[0] for i in head_linears]
    extras = med_config.get("rayapp", {})  # our exports record what shapes cannot tell
    dropout = float(med_config.get("hidden_dropout_prob", 0.1))
    return RewardModelConfig(
        image_size=round(num_patches ** 0.5) * patch,
        patch_size=patch,
        vision_hidden_size=vision_width,
        vision_num_layers=len(blocks),
        vision_num_heads=int(extras.get("vision_num_heads", vision_width // 64)),  # ViT head width is 64
        vision_intermediate_size=shape("blip.visual_encoder.blocks.0.mlp.fc1.weight")[0],
        vision_layer_norm_eps=float(extras.get("vision_layer_norm_eps", 1e-6)),
        text_hidden_size=int(med_config["hidden_size"]),
        text_num_layers=int(med_config["num_hidden_layers"]),
        text_num_heads=int(med_config["num_attention_heads"]),
        text_intermediate_size=int(med_config["intermediate_size"]),
        text_dropout=dropout,
        text_max_positions=int(med_config.get("max_position_embeddings", 512)),
        vocab_size=int(med_config["vocab_size"]),
        max_length=int(extras.get("max_length", 35)),
        head_hidden_sizes=head_sizes[:-1],
        head_dropouts=[float(x) for x in extras.get("head_dropouts", [0.2, 0.2, 0.1][: len(head_sizes) - 2])],
        reward_mean=REFERENCE_REWARD_MEAN,
        reward_std=REFERENCE_REWARD_STD,
        tokenizer=extras.get("tokenizer", "bert-base-uncased"),
    )


def load_official_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Rename official keys to ours and load strictly; unknown official keys are reported by name."""
    renamed: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for key, tensor in state.items():
        if IGNORED_OFFICIAL_KEYS.search(key):
            continue
        ours = official_to_ours(key) or f"<unmapped>.{key}"
        renamed[ours] = tensor
        names[ours] = key
    for ours in model.state_dict():
        names.setdefault(ours, internal_to_official(ours))
    load_state_strict(model, renamed, source, names)


def med_config_dict(config: RewardModelConfig) -> dict:
    """The reference's med_config.json for this architecture, plus a `rayapp` block of what shapes omit."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": config.text_dropout,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.text_dropout,
        "hidden_size": config.text_hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.text_intermediate_size,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": config.text_max_positions,
        "model_type": "bert",
        "num_attention_heads": config.text_num_heads,
        "num_hidden_layers": config.text_num_layers,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": config.vocab_size,
        "encoder_width": config.text_hidden_size,  # as the hub file says; the code uses the vision width
        "add_cross_attention": True,
        "rayapp": {
            "vision_num_heads": config.vision_num_heads,
            "vision_layer_norm_eps": config.vision_layer_norm_eps,
            "max_length": config.max_length,
            "head_dropouts": list(config.head_dropouts),
            "tokenizer": config.tokenizer,
        },
    }


def export_official(model, save_dir: str | os.PathLike) -> None:
    """Write ImageReward.pt (reference key names, fp32) and med_config.json; tokenizer files beside them.

    The reference hard-codes its output normalisation, so ours is folded into the last Linear layer:
    the exported file then yields exactly our rewards under the reference's constants.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    last = f"head.layers.{len(model.head.layers) - 1}"
    scale = REFERENCE_REWARD_STD / config.reward_std
    state[f"{last}.weight"] = state[f"{last}.weight"] * scale
    state[f"{last}.bias"] = (state[f"{last}.bias"] - config.reward_mean) * scale + REFERENCE_REWARD_MEAN
    torch.save({internal_to_official(k): v for k, v in state.items()}, save_dir / OFFICIAL_WEIGHTS)
    (save_dir / OFFICIAL_MED_CONFIG).write_text(json.dumps(med_config_dict(config), indent=2) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(os.fspath(save_dir))


# ---- our format ---------------------------------------------------------------------------------
def save_weights_dir(model: torch.nn.Module, save_dir: str | os.PathLike, config_file: str, config: dict) -> None:
    """`config_file` (JSON of `config`) + model.safetensors (+ the model's tokenizer files, if it has one)."""
    from safetensors.torch import save_file

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / config_file).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(save_dir / PRETRAINED_WEIGHTS), metadata={"format": "pt", "library": "rayapp"})
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(save_dir))


def save_pretrained(model, save_dir: str | os.PathLike) -> None:
    """config.json + model.safetensors (+ tokenizer files): everything `rayapp.load(dir)` needs."""
    save_weights_dir(model, save_dir, PRETRAINED_CONFIG, model.config.to_dict())


def read_pretrained_state(save_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The safetensors weights of a `save_pretrained` / `save_weights_dir` directory (no pickle involved)."""
    return read_state_dict(Path(save_dir) / PRETRAINED_WEIGHTS)


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    """Whether a directory holds a saved tokenizer."""
    directory = Path(directory)
    return (directory / "tokenizer_config.json").is_file() and (
        (directory / "tokenizer.json").is_file() or (directory / "vocab.txt").is_file()
    )
