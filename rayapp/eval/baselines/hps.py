"""HPSv2 / HPSv2.1 (Human Preference Score v2, Wu et al., 2023): an open_clip ViT-H-14 fine-tuned on HPD v2.

score = image_embedding . text_embedding of the normalised embeddings (a cosine, about 0.2..0.35), the number
`hpsv2.score` returns; the HPS v2 benchmark reports it x 100 (`rayapp eval hps`).

The checkpoint is open_clip's: `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` of the hub repo `xswu/HPSv2`
hold an open_clip `CLIP` state dict under `state_dict`, read with torch.load(weights_only=True). Its towers are
those of a transformers `CLIPModel` with exact GELU, so `clip_state_from_open_clip` renames (and, for the
packed attention projections, splits) the tensors into one; `architecture` (an open_clip model config, by name
or as a dict; default ViT-H-14) gives the shapes. Weights load through huggingface_hub's `hf_hub_download`, so the
Hugging Face cache and HF_HUB_OFFLINE are honoured; the tokenizer is open_clip's CLIP BPE, the one of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (or `tokenizer=`).

Images are prepared as the reference's `preprocess_val` does (not CLIP's crop): RGB, [0,1] floats, bicubic
antialiased resize of the longest side to 224 (new sides round(side x scale)), zero padding to a square (left /
top get the smaller half), then OpenAI mean/std. The PIL path and the differentiable path are that one function.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rayapp.model.images import CLIP_MEAN, CLIP_STD, DEFAULT_MAX_PIXELS, load_image

from .clip import CLIPScorer, clip_tokenizer
from .download import RealWeights

HPS_HUB_REPO = "xswu/HPSv2"
HPS_FILES = {"HPSv2": "HPS_v2_compressed.pt", "HPSv2.1": "HPS_v2.1_compressed.pt"}
HPS_TOKENIZER_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # open_clip's CLIP BPE in transformers' format
DEFAULT_ARCHITECTURE = "ViT-H-14"

# open_clip model configs (the fields its CLIP reads); ViT-H-14 as open_clip ships it.
OPEN_CLIP_ARCHITECTURES: dict[str, dict] = {
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
}


def resolve_architecture(architecture: Any = None) -> dict:
    """An open_clip model config: a known name, a config dict, or a JSON file of one (default ViT-H-14)."""
    if architecture is None:
        architecture = DEFAULT_ARCHITECTURE
    if isinstance(architecture, dict):
        config = architecture
    elif str(architecture) in OPEN_CLIP_ARCHITECTURES:
        config = OPEN_CLIP_ARCHITECTURES[str(architecture)]
    elif Path(str(architecture)).is_file():
        config = json.loads(Path(str(architecture)).read_text())
    else:
        raise ValueError(f"unknown open_clip architecture {architecture!r}; give one of "
                         f"{sorted(OPEN_CLIP_ARCHITECTURES)}, an open_clip model config dict or its JSON file")
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"open_clip architecture {config!r} lacks {missing}")
    return config


def clip_config_from_open_clip(architecture: dict, tokenizer) -> Any:
    """The transformers CLIPConfig of an open_clip ViT / text-transformer CLIP (exact GELU, eps 1e-5)."""
    from transformers import CLIPConfig

    vision, text = architecture["vision_cfg"], architecture["text_cfg"]
    vision_width, text_width = int(vision["width"]), int(text["width"])
    text_config = {
        "vocab_size": int(text.get("vocab_size", 49408)), "hidden_size": text_width,
        "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)), "num_hidden_layers": int(text["layers"]),
        "num_attention_heads": int(text.get("heads", 8)),
        "max_position_embeddings": int(text.get("context_length", 77)),
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": vision_width, "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
        "num_hidden_layers": int(vision["layers"]),
        "num_attention_heads": vision_width // int(vision.get("head_width", 64)),
        "image_size": int(vision["image_size"]), "patch_size": int(vision["patch_size"]),
        "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config,
                      projection_dim=int(architecture["embed_dim"]))


_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP_LEVEL = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def _block_tensors(tower: str, index: str, part: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"{tower}.encoder.layers.{index}."
    if part in ("attn.in_proj_weight", "attn.in_proj_bias"):  # packed q, k, v -> three projections
        kind = "weight" if part.endswith("weight") else "bias"
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{name}_proj.{kind}": t.contiguous() for name, t in zip("qkv", (q, k, v))}
    module, _, kind = part.rpartition(".")
    if module not in _BLOCK_PARTS:
        raise KeyError(part)
    return {f"{prefix}{_BLOCK_PARTS[module]}.{kind}": value}


def clip_state_from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict (ViT image tower, transformer text tower) -> transformers CLIPModel names."""
    state = {key.removeprefix("module."): value for key, value in state.items()}
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        block = _BLOCK.match(key)
        try:
            if block:
                tower = "vision_model" if block.group(1) else "text_model"
                converted.update(_block_tensors(tower, block.group(2), block.group(3), value))
            elif key in _TOP_LEVEL:
                converted[_TOP_LEVEL[key]] = value
            elif key in _TRANSPOSED:
                converted[_TRANSPOSED[key]] = value.t().contiguous()
            else:
                unknown.append(key)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip ViT CLIP state dict (HPS format): unexpected keys {unknown[:5]}")
    return converted


def hps_pixels(images_0_1: torch.Tensor, image_size: int) -> torch.Tensor:
    """The reference's eval transform on [B,3,H,W] floats in [0,1]: longest side to `image_size` (bicubic,
    antialiased), zero-pad to a square, OpenAI mean/std -> [B,3,S,S]; differentiable."""
    if images_0_1.ndim != 4 or images_0_1.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images_0_1.shape)}")
    height, width = images_0_1.shape[-2:]
    scale = image_size / float(max(height, width))
    x = images_0_1
    new_h, new_w = height, width
    if scale != 1.0:
        new_h, new_w = round(height * scale), round(width * scale)
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = image_size - new_h, image_size - new_w
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class HPSScorer(CLIPScorer):
    """cos(image, text) of HPS's CLIP, on images prepared as HPS prepares them (resize longest side + pad)."""

    name = "HPSv2.1"

    def __init__(self, clip_config, tokenizer, model=None, architecture: dict | None = None):
        super().__init__(clip_config, tokenizer, model=model)
        self.architecture = architecture

    def preprocess_tensor(self, images_0_1: torch.Tensor) -> torch.Tensor:
        """The differentiable path from images in [0,1] to the model's pixels (the same transform as scoring)."""
        return hps_pixels(images_0_1, self.image_size)

    def preprocess(self, images: Sequence[Any], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   start: int = 0) -> torch.Tensor:
        """Decode image inputs and apply HPS's eval transform -> [N,3,S,S]; errors name the item's index."""
        pixels = []
        for i, item in enumerate(images):
            rgb = np.asarray(load_image(item, start + i, max_pixels=max_pixels).convert("RGB"), dtype=np.float32)
            tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None] / 255.0
            pixels.append(hps_pixels(tensor, self.image_size)[0])
        return torch.stack(pixels)

    def config_dict(self) -> dict:
        return {"clip_config": self.model.config.to_dict(), "architecture": self.architecture}


def tiny_architecture(tokenizer) -> dict:
    """An open_clip config of toy widths (64-px images, 8-px patches, 2 layers a side) over `tokenizer`."""
    return {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 8,
                                            "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": len(tokenizer), "width": 32, "heads": 4, "layers": 2}}


def build_tiny(tokenizer=None) -> HPSScorer:
    """Random toy-size HPS model over `tokenizer` (default: the tiny CLIP BPE vocabulary)."""
    tok = clip_tokenizer(tokenizer)
    architecture = tiny_architecture(tok)
    return HPSScorer(clip_config_from_open_clip(architecture, tok), tok, architecture=architecture)


def load_saved(meta: dict, directory: Path) -> HPSScorer:
    """The architecture a `save_pretrained` directory describes (weights are loaded by the caller)."""
    from transformers import CLIPConfig

    return HPSScorer(CLIPConfig.from_dict(meta["clip_config"]), clip_tokenizer(directory),
                     architecture=meta.get("architecture"))


def from_open_clip_state(state: dict[str, torch.Tensor], source: RealWeights, origin: str) -> HPSScorer:
    """An HPSScorer with an open_clip state dict of `source.architecture`, tokenizer `source.tokenizer`."""
    from transformers import CLIPModel

    architecture = resolve_architecture(source.architecture)
    tokenizer = clip_tokenizer(source.tokenizer if source.tokenizer is not None else HPS_TOKENIZER_REPO)
    config = clip_config_from_open_clip(architecture, tokenizer)
    model = CLIPModel(config)
    converted = clip_state_from_open_clip(state)
    expected = set(model.state_dict()) - {k for k in model.state_dict() if k.endswith("position_ids")}
    missing, unexpected = expected - set(converted), set(converted) - expected
    if missing or unexpected:
        raise ValueError(f"{origin}: not a {architecture} checkpoint (missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}); pass architecture=")
    for key, value in converted.items():
        wanted = model.state_dict()[key].shape
        if value.shape != wanted:
            raise ValueError(f"{origin}: {key} has shape {tuple(value.shape)}, the architecture wants "
                             f"{tuple(wanted)}; pass the checkpoint's architecture=")
    model.load_state_dict(converted, strict=False)  # position_ids are buffers transformers makes itself
    return HPSScorer(config, tokenizer, model=model.float(), architecture=architecture)


def load_official(path: Path, source: RealWeights) -> HPSScorer:
    """An HPS checkpoint in its authors' format: a `.pt` with the open_clip state dict under `state_dict`."""
    from rayapp.model.checkpoint import read_state_dict

    if Path(path).is_dir():
        candidates = [Path(path) / name for name in HPS_FILES.values() if (Path(path) / name).is_file()]
        if not candidates:
            raise FileNotFoundError(f"{path} has neither scorer.json nor an HPS checkpoint "
                                    f"({sorted(HPS_FILES.values())})")
        path = candidates[0]
    return from_open_clip_state(read_state_dict(path), source, os.fspath(path))


def load_real(source: RealWeights) -> HPSScorer:
    """`source.weights`, else the version's file of xswu/HPSv2 (hf_hub_download: cache and offline honoured)."""
    from .download import fetch_weights

    if source.weights:
        path = fetch_weights(source.weights, source.download_root)
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(HPS_HUB_REPO, HPS_FILES[source.scorer or "HPSv2.1"], cache_dir=source.cache_dir)
    return load_official(Path(path), source)
