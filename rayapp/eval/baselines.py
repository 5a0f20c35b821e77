"""The paper's baseline scorers, with ImageReward's call shapes: `load_score("CLIP" | "BLIP" | "Aesthetic")`.

- CLIP: cosine of CLIP ViT-L/14 image and text embeddings (transformers `CLIPModel`).
- BLIP: cosine of BLIP's projected image and text [CLS] embeddings, the text encoder in unimodal mode
  (no cross-attention), as the reference's `BLIPScore` (BLIP ITC features).
- Aesthetic: the LAION "improved aesthetic predictor" MLP on the L2-normalised CLIP ViT-L/14 image
  embedding (the prompt is ignored).

Where the real weights come from (what the reference package `image-reward` 1.5 downloads, `utils.py`):
- CLIP: the reference uses openai/CLIP's `ViT-L-14.pt`; the same weights in transformers format are the hub
  repo `openai/clip-vit-large-patch14` (model + tokenizer), which is what we load.
- BLIP: `https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth`
  (Salesforce's BLIP pre-trained ViT-L checkpoint; a dict whose `"model"` entry is the state_dict,
  keys `visual_encoder.*`, `text_encoder.*`, `vision_proj.*`, `text_proj.*` and unused others), with
  the BERT-base text config of `THUDM/ImageReward/med_config.json` and the `bert-base-uncased` tokenizer
  plus `[DEC]`/`[ENC]`. It is not on the Hugging Face hub, so we fetch that URL (into the reference's
  cache dir `~/.cache/ImageReward`, so an existing reference download is reused).
- Aesthetic: `https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/`
  `sac%2Blogos%2Bava1-l14-linearMSE.pth` (state_dict `layers.{0,2,4,6,7}.{weight,bias}`, 768 -> 1), on
  top of `openai/clip-vit-large-patch14`'s vision tower and projection. A third-party hub mirror is
  usable with `weights="hf://camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"`
  (not verified against the original here).

Unlike the reference (path-only inputs, one image at a time, fp32 only) every scorer takes any image
input kind (PIL / path / bytes / ndarray / tensor), batches, runs under inference_mode, and has a dtype.
Tiny random configs (`config="tiny"`) exist for tests; `save_pretrained(dir)` / `load_score(name, dir)`
round-trip any scorer offline (safetensors).
"""
from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rayapp.model.images import DEFAULT_MAX_PIXELS, load_image, preprocess_pil
from rayapp.model.scoring import BatchScoringMixin

CLIP_HUB_REPO = "openai/clip-vit-large-patch14"
BLIP_WEIGHTS_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"
AESTHETIC_WEIGHTS_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)
DEFAULT_DOWNLOAD_ROOT = "~/.cache/ImageReward"  # the reference's cache dir
SCORER_CONFIG = "scorer.json"
SCORER_WEIGHTS = "model.safetensors"
BLIP_EMBED_DIM = 256  # BLIP's ITC projection width
AESTHETIC_HIDDEN = [1024, 128, 64, 16]
AESTHETIC_DROPOUTS = [0.2, 0.2, 0.1]

NAMES = ("CLIP", "BLIP", "Aesthetic")


def available_scores() -> list[str]:
    """Names accepted by `load_score`."""
    return list(NAMES)


def canonical_name(name: str) -> str:
    for known in NAMES:
        if name.lower() == known.lower():
            return known
    raise ValueError(f"Score {name!r} not found; available scores = {list(NAMES)}")


# ------------------------------------------------------------------------------------------ fetching
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def fetch_weights(source: str, download_root: str | os.PathLike | None = None) -> Path:
    """A local file for `source`: a path, `hf://owner/repo/file` (huggingface_hub), or an https URL.

    URLs are downloaded once into `download_root` (default ~/.cache/ImageReward) under their file name,
    through a temporary file renamed on completion; with HF_HUB_OFFLINE=1 only cached files are used.
    """
    if source.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        owner, repo, filename = source[len("hf://"):].split("/", 2)
        return Path(hf_hub_download(repo_id=f"{owner}/{repo}", filename=filename,
                                    cache_dir=os.fspath(download_root) if download_root else None))
    if not source.startswith(("http://", "https://")):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {source!r} not found")
        return path
    root = Path(download_root or DEFAULT_DOWNLOAD_ROOT).expanduser()
    target = root / urllib.request.url2pathname(source.rsplit("/", 1)[-1])
    if target.is_file():
        return target
    if _offline():
        raise OSError(f"{target} is not cached and HF_HUB_OFFLINE is set; download {source} there first")
    root.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(source) as response, open(partial, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    os.replace(partial, target)
    return target


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or torch.load(weights_only=True): tensors and plain containers only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(os.fspath(path))
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not fit: missing {missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} "
            f"({len(unexpected)}), shape mismatches {shapes[:10]}"
        )
    module.load_state_dict(state, strict=True)


def _resolve_dtype(dtype):
    from rayapp.model.modeling import resolve_dtype

    return resolve_dtype(dtype)


# ------------------------------------------------------------------------------------- common API
class BaselineScorer(BatchScoringMixin, nn.Module):
    """Shared scoring API: subclasses provide `tokenize`, `_forward_scores` and (de)serialisation."""

    name = "baseline"
    uses_prompt = True

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = int(image_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def set_dtype(self, dtype) -> BaselineScorer:
        if dtype is not None:
            self.to(dtype=_resolve_dtype(dtype))
        return self

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _forward_scores(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def score_batch(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """float32 scores [B] for preprocessed pixels [B,3,S,S] and token ids/masks [B,L]."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        return self._forward_scores(pixel_values, input_ids.to(self.device), attention_mask.to(self.device)).float()

    def preprocess(self, images: Sequence[Any], *, max_pixels: int = DEFAULT_MAX_PIXELS, start: int = 0) -> torch.Tensor:
        """CLIP/BLIP preprocessing (bicubic short-side resize, center crop, CLIP normalisation) -> [N,3,S,S]."""
        return torch.stack([
            preprocess_pil(load_image(item, start + i, max_pixels=max_pixels), self.image_size)
            for i, item in enumerate(images)
        ])

    # ---- persistence ------------------------------------------------------------------------------
    def _config_dict(self) -> dict:
        raise NotImplementedError

    def save_pretrained(self, save_dir: str | os.PathLike) -> None:
        """scorer.json + model.safetensors (+ tokenizer files): what `load_score(name, save_dir)` reads."""
        from safetensors.torch import save_file

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / SCORER_CONFIG).write_text(json.dumps({"scorer": self.name, **self._config_dict()}, indent=2))
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.fspath(save_dir / SCORER_WEIGHTS), metadata={"format": "pt", "library": "rayapp"})
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.fspath(save_dir))


# --------------------------------------------------------------------------------------------- CLIP
def _clip_tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """clip.tokenize(truncate=True) equivalent: <|startoftext|> ... <|endoftext|>, padded to max_length."""
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class CLIPScorer(BaselineScorer):
    """cos(image embedding, text embedding) of a CLIP model (ViT-L/14 for the real one)."""

    name = "CLIP"

    def __init__(self, clip_config, tokenizer, model=None):
        from transformers import CLIPModel

        model = model if model is not None else CLIPModel(clip_config)
        super().__init__(model.config.vision_config.image_size)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def tokenize(self, prompts):
        return _clip_tokenize(self.tokenizer, prompts, self.max_length)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def _forward_scores(self, pixel_values, input_ids, attention_mask):
        return (self.image_embeds(pixel_values) * self.text_embeds(input_ids, attention_mask)).sum(-1)

    def _config_dict(self) -> dict:
        return {"clip_config": self.model.config.to_dict()}


def tiny_clip_config(tokenizer, projection_dim: int = 32):
    """A CLIP of toy widths (64-px images, 8-px patches, 2 layers a side) over `tokenizer`'s vocabulary."""
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=64, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


# ---------------------------------------------------------------------------------------- Aesthetic
class AestheticScorer(BaselineScorer):
    """LAION improved-aesthetic-predictor: MLP(normalize(CLIP image embedding)); the prompt is unused."""

    name = "Aesthetic"
    uses_prompt = False

    def __init__(self, vision_config, projection_dim: int, hidden_sizes=AESTHETIC_HIDDEN, dropouts=AESTHETIC_DROPOUTS,
                 clip_vision=None):
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from rayapp.model.modeling import (
            RewardHead,  # the same five-Linear, no-activation MLP
        )

        if clip_vision is None:
            config = CLIPVisionConfig(**{**vision_config.to_dict(), "projection_dim": projection_dim})
            clip_vision = CLIPVisionModelWithProjection(config)
        super().__init__(clip_vision.config.image_size)
        self.clip_vision = clip_vision
        self.mlp = RewardHead(projection_dim, list(hidden_sizes), list(dropouts))
        self.hidden_sizes, self.dropouts = list(hidden_sizes), list(dropouts)

    def tokenize(self, prompts):
        zeros = torch.zeros(len(prompts), 1, dtype=torch.long)
        return zeros, zeros

    def _forward_scores(self, pixel_values, input_ids, attention_mask):
        embeds = self.clip_vision(pixel_values=pixel_values).image_embeds
        features = F.normalize(embeds.float(), dim=-1)
        return self.mlp(features.to(self.mlp.layers[0].weight.dtype))

    def _config_dict(self) -> dict:
        return {"vision_config": self.clip_vision.config.to_dict(), "projection_dim": self.clip_vision.config.projection_dim,
                "hidden_sizes": self.hidden_sizes, "dropouts": self.dropouts}


# --------------------------------------------------------------------------------------------- BLIP
class BLIPScorer(BaselineScorer):
    """cos(vision_proj(ViT [CLS]), text_proj(BERT [CLS], unimodal text mode)) -- BLIP's ITC similarity."""

    name = "BLIP"

    def __init__(self, config, tokenizer, embed_dim: int = BLIP_EMBED_DIM):
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        from rayapp.model.modeling import _text_config, _vision_config

        super().__init__(config.image_size)
        self.config = config
        self.embed_dim = int(embed_dim)
        self.tokenizer = tokenizer
        self.vision = BlipVisionModel(_vision_config(config))
        text_config = _text_config(config)
        text_config.is_decoder = False  # unimodal mode never cross-attends: do not build those layers
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.vision_proj = nn.Linear(config.vision_hidden_size, self.embed_dim)
        self.text_proj = nn.Linear(config.text_hidden_size, self.embed_dim)

    def tokenize(self, prompts):
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.config.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def _forward_scores(self, pixel_values, input_ids, attention_mask):
        image_cls = self.vision(pixel_values=pixel_values).last_hidden_state[:, 0, :]
        text_cls = self.text(input_ids=input_ids, attention_mask=attention_mask, is_decoder=False).last_hidden_state[:, 0, :]
        image = F.normalize(self.vision_proj(image_cls).float(), dim=-1)
        text = F.normalize(self.text_proj(text_cls).float(), dim=-1)
        return (image * text).sum(-1)

    def _config_dict(self) -> dict:
        return {"config": self.config.to_dict(), "embed_dim": self.embed_dim}

    def load_reference_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load BLIP's `model_large.pth` state_dict (BLIP_Pretrain key names); unused parts are dropped."""
        from rayapp.model.checkpoint import official_to_internal

        ours: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if key.startswith(("vision_proj.", "text_proj.")):
                ours[key] = tensor
            elif key.startswith(("visual_encoder.", "text_encoder.")):
                if ".crossattention." in key or key.endswith(".position_ids"):
                    continue  # multimodal-only weights; text mode skips them
                mapped = official_to_internal("blip." + key)
                if mapped is None:
                    raise ValueError(f"{source}: unknown BLIP key {key!r}")
                ours[mapped] = tensor
            # momentum encoders (*_m), itm_head, text_decoder, queues and temp are not used by the score
        _load_strict(self, ours, source)


# ------------------------------------------------------------------------------------------ loading
_TINY_BERT_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "one", "two", "three", "four", "red", "green", "blue", "yellow", "white", "black", "purple", "orange", "circle", "circles", "square", "squares", "triangle", "triangles", "small", "large", "background", "photo", "cat", "dog"]


def _tiny_bert_tokenizer(tokenizer):
    from rayapp.model.tokenizer import build_wordpiece_tokenizer, load_tokenizer

    if tokenizer is None:
        return build_wordpiece_tokenizer(_TINY_BERT_WORDS)
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer


def _clip_tokenizer(tokenizer, default: str | None):
    from transformers import CLIPTokenizer

    if tokenizer is None and default is None:
        from rayapp.diffusion.tiny import build_tiny_clip_tokenizer

        return build_tiny_clip_tokenizer()
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return CLIPTokenizer.from_pretrained(os.fspath(tokenizer or default))
    return tokenizer


def _build_tiny(name: str, tokenizer, seed: int) -> BaselineScorer:
    from rayapp.model.config import get_preset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "CLIP":
            tok = _clip_tokenizer(tokenizer, None)
            return CLIPScorer(tiny_clip_config(tok), tok)
        if name == "Aesthetic":
            vision = tiny_clip_config(_clip_tokenizer(None, None)).vision_config
            return AestheticScorer(vision, projection_dim=32, hidden_sizes=[32, 16, 8, 4], dropouts=[0.0, 0.0, 0.0])
        tok = _tiny_bert_tokenizer(tokenizer)
        config = get_preset("tiny")
        if len(tok) > config.vocab_size:
            config = get_preset("tiny", vocab_size=len(tok))
        return BLIPScorer(config, tok, embed_dim=32)


def _load_saved(name: str, directory: Path) -> BaselineScorer:
    from safetensors.torch import load_file

    meta = json.loads((directory / SCORER_CONFIG).read_text())
    if meta.get("scorer") != name:
        raise ValueError(f"{directory} holds a {meta.get('scorer')!r} scorer, not {name!r}")
    if name == "CLIP":
        from transformers import CLIPConfig

        scorer: BaselineScorer = CLIPScorer(CLIPConfig.from_dict(meta["clip_config"]), _clip_tokenizer(directory, None))
    elif name == "Aesthetic":
        from transformers import CLIPVisionConfig

        scorer = AestheticScorer(CLIPVisionConfig.from_dict(meta["vision_config"]), meta["projection_dim"],
                                 meta["hidden_sizes"], meta["dropouts"])
    else:
        from rayapp.model.config import RewardModelConfig
        from rayapp.model.tokenizer import load_tokenizer

        scorer = BLIPScorer(RewardModelConfig.from_dict(meta["config"]), load_tokenizer(directory), meta["embed_dim"])
    _load_strict(scorer, load_file(os.fspath(directory / SCORER_WEIGHTS)), os.fspath(directory))
    return scorer


def _load_real(name: str, download_root, weights: str | None, tokenizer, clip_model: str,
               blip_preset: str) -> BaselineScorer:
    if name == "CLIP":
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(clip_model, cache_dir=download_root and os.fspath(download_root))
        return CLIPScorer(model.config, _clip_tokenizer(tokenizer, clip_model), model=model)
    if name == "Aesthetic":
        from transformers import CLIPVisionModelWithProjection

        vision = CLIPVisionModelWithProjection.from_pretrained(clip_model, cache_dir=download_root and os.fspath(download_root))
        path = fetch_weights(weights or AESTHETIC_WEIGHTS_URL, download_root)
        state = _read_state(path)
        # the MLP's widths come from the file (768 -> 1024 -> 128 -> 64 -> 16 -> 1 for the LAION predictor)
        linears = sorted(int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight"))
        if not linears:
            raise ValueError(f"{path}: no layers.N.weight entries; not an aesthetic-predictor state_dict")
        widths = [int(state[f"layers.{i}.weight"].shape[0]) for i in linears]
        dropouts = AESTHETIC_DROPOUTS if len(widths) == len(AESTHETIC_HIDDEN) + 1 else [0.0] * (len(widths) - 2)
        scorer = AestheticScorer(vision.config, vision.config.projection_dim, widths[:-1], dropouts, clip_vision=vision)
        _load_strict(scorer.mlp, state, os.fspath(path))
        return scorer
    from rayapp.model.config import get_preset
    from rayapp.model.tokenizer import load_tokenizer

    path = fetch_weights(weights or BLIP_WEIGHTS_URL, download_root)
    tok = load_tokenizer(tokenizer or "bert-base-uncased")
    # BLIP ViT-L/16 + BERT-base (THUDM/ImageReward med_config.json) are the ImageReward encoders' shapes.
    state = _read_state(path)
    embed_dim = int(state["vision_proj.weight"].shape[0]) if "vision_proj.weight" in state else BLIP_EMBED_DIM
    scorer = BLIPScorer(get_preset(blip_preset), tok, embed_dim)
    scorer.load_reference_state(state, os.fspath(path))
    return scorer


def load_score(
    name: str = "CLIP",
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    download_root: str | os.PathLike | None = None,
    config: str | None = None,
    weights: str | None = None,
    tokenizer: Any = None,
    clip_model: str = CLIP_HUB_REPO,
    blip_preset: str = "imagereward-v1",
    seed: int = 0,
) -> BaselineScorer:
    """Load a baseline scorer in eval mode.

    name: "CLIP", "BLIP" or "Aesthetic" (case-insensitive).
    path: a directory written by `scorer.save_pretrained` (offline, safetensors); a device string here
      ("cpu", "cuda:0") is taken as the device, as in the reference's `load_score(name, device, download_root)`.
    config: "tiny" builds random toy-size weights (seeded by `seed`) for tests and offline demos.
    Otherwise the real weights (see the module docstring): CLIP / Aesthetic's CLIP from the hub repo
    `clip_model` (a hub name or a local transformers directory); BLIP / Aesthetic's file from the
    reference's URL, or `weights` (a local file, `hf://owner/repo/file` or a URL); `blip_preset` names the
    encoder shapes of the BLIP file (the ViT-L/16 + BERT-base of "imagereward-v1" for model_large.pth).
    `download_root` defaults to ~/.cache/ImageReward for the files.
    device: default CUDA when available, else CPU. dtype: "float32" (default), "bfloat16", "float16".
    """
    name = canonical_name(name)
    if isinstance(path, torch.device) or (isinstance(path, str) and (path in ("cpu", "mps") or path.startswith("cuda"))):
        device, path = path, None  # the reference's positional order is load_score(name, device, download_root)
    if config is not None:
        if config != "tiny":
            raise ValueError(f"unknown baseline config {config!r}; only 'tiny' is built in")
        scorer = _build_tiny(name, tokenizer, seed)
    elif path is not None:
        directory = Path(path)
        if not (directory / SCORER_CONFIG).is_file():
            raise FileNotFoundError(f"{directory} has no {SCORER_CONFIG}; save a scorer there with save_pretrained")
        scorer = _load_saved(name, directory)
    else:
        scorer = _load_real(name, download_root, weights, tokenizer, clip_model, blip_preset)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer.to(device)
    scorer.set_dtype(dtype)
    scorer.eval()
    return scorer
