"""BLIP score: cos of BLIP's projected image and text [CLS] embeddings, the text encoder in unimodal mode
(no cross-attention), as the reference's `BLIPScore` (BLIP ITC features).

Real weights: `https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth`
(Salesforce's BLIP pre-trained ViT-L checkpoint; a dict whose `"model"` entry is the state_dict, keys
`visual_encoder.*`, `text_encoder.*`, `vision_proj.*`, `text_proj.*` and unused others), with the
BERT-base text config of `THUDM/ImageReward/med_config.json` (preset `imagereward-v1`) and the
`bert-base-uncased` tokenizer plus `[DEC]`/`[ENC]`. It is not on the Hugging Face hub, so the URL is
fetched into the reference's cache dir `~/.cache/ImageReward` (an existing reference download is reused).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rayapp.model.checkpoint import (
    load_state_strict,
    official_to_ours,
    read_state_dict,
)
from rayapp.model.config import RewardModelConfig, get_preset
from rayapp.model.modeling import blip_text_config, blip_vision_config
from rayapp.model.tokenizer import build_wordpiece_tokenizer, load_tokenizer

from .base import BaselineScorer
from .download import RealWeights, fetch_weights

BLIP_WEIGHTS_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"
BLIP_EMBED_DIM = 256  # BLIP's ITC projection width


class BLIPScorer(BaselineScorer):
    """cos(vision_proj(ViT [CLS]), text_proj(BERT [CLS], unimodal text mode)) -- BLIP's ITC similarity."""

    name = "BLIP"

    def __init__(self, config: RewardModelConfig, tokenizer, embed_dim: int = BLIP_EMBED_DIM):
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__(config.image_size)
        self.config = config
        self.embed_dim = int(embed_dim)
        self.tokenizer = tokenizer
        self.vision = BlipVisionModel(blip_vision_config(config))
        text_config = blip_text_config(config)
        text_config.is_decoder = False  # unimodal mode never cross-attends: do not build those layers
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.vision_proj = nn.Linear(config.vision_hidden_size, self.embed_dim)
        self.text_proj = nn.Linear(config.text_hidden_size, self.embed_dim)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT ids padded / truncated to the config's max_length, `[CLS]` first."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.config.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward_scores(self, pixel_values, input_ids, attention_mask):
        image_cls = self.vision(pixel_values=pixel_values).last_hidden_state[:, 0, :]
        text_cls = self.text(input_ids=input_ids, attention_mask=attention_mask,
                             is_decoder=False).last_hidden_state[:, 0, :]
        image = F.normalize(self.vision_proj(image_cls).float(), dim=-1)
        text = F.normalize(self.text_proj(text_cls).float(), dim=-1)
        return (image * text).sum(-1)

    def config_dict(self) -> dict:
        return {"config": self.config.to_dict(), "embed_dim": self.embed_dim}

    def load_reference_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load BLIP's `model_large.pth` state_dict (BLIP_Pretrain key names); unused parts are dropped."""
        ours: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if key.startswith(("vision_proj.", "text_proj.")):
                ours[key] = tensor
            elif key.startswith(("visual_encoder.", "text_encoder.")):
                if ".crossattention." in key or key.endswith(".position_ids"):
                    continue  # multimodal-only weights; text mode skips them
                mapped = official_to_ours("blip." + key)
                if mapped is None:
                    raise ValueError(f"{source}: unknown BLIP key {key!r}")
                ours[mapped] = tensor
            # momentum encoders (*_m), itm_head, text_decoder, queues and temp are not used by the score
        load_state_strict(self, ours, source)


def bert_tokenizer(tokenizer=None):
    """A BLIP BERT tokenizer from an object, a dir or hub name; None builds one over the synthetic captions' words."""
    if tokenizer is None:
        from rayapp.data.synth import vocabulary

        return build_wordpiece_tokenizer(vocabulary())
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer


def build_tiny(tokenizer=None) -> BLIPScorer:
    """Random encoders of the `tiny` preset (vocabulary widened to the tokenizer's) with 32-wide projections."""
    tok = bert_tokenizer(tokenizer)
    config = get_preset("tiny")
    if len(tok) > config.vocab_size:
        config = get_preset("tiny", vocab_size=len(tok))
    return BLIPScorer(config, tok, embed_dim=32)


def load_saved(meta: dict, directory: Path) -> BLIPScorer:
    """The architecture a `save_pretrained` directory describes (weights are loaded by the caller)."""
    return BLIPScorer(RewardModelConfig.from_dict(meta["config"]), load_tokenizer(directory), meta["embed_dim"])


def load_real(source: RealWeights) -> BLIPScorer:
    """BLIP's `model_large.pth` (or `source.weights`) in the encoder shapes of preset `source.blip_preset`."""
    path = fetch_weights(source.weights or BLIP_WEIGHTS_URL, source.download_root)
    tok = bert_tokenizer(source.tokenizer if source.tokenizer is not None else "bert-base-uncased")
    state = read_state_dict(path)
    embed_dim = int(state["vision_proj.weight"].shape[0]) if "vision_proj.weight" in state else BLIP_EMBED_DIM
    scorer = BLIPScorer(get_preset(source.blip_preset), tok, embed_dim)
    scorer.load_reference_state(state, os.fspath(path))
    return scorer
