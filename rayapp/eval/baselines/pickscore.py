"""PickScore: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences (Kirstain et al., 2023).

score = logit_scale.exp() x cos(image embedding, text embedding), the quantity the authors' published snippet
computes (`model.logit_scale.exp() * (image_embs @ text_embs.T)` on normalised embeddings); about 15..25.

Real weights: the transformers `CLIPModel` of the hub repo `yuvalkirstain/PickScore_v1`, with the processor of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (its tokenizer; its image transform is CLIP's short-side bicubic resize
to 224, center crop and OpenAI mean/std, which `preprocess` applies). Both load through `from_pretrained`, so
the Hugging Face cache and HF_HUB_OFFLINE are honoured. A local transformers directory of the same format
(`CLIPModel.save_pretrained`, with or without tokenizer files) loads as a path (`load_official`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .clip import CLIPScorer, clip_tokenizer, tiny_clip_config
from .download import RealWeights

PICKSCORE_HUB_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreScorer(CLIPScorer):
    """logit_scale.exp() x cos(image, text) of a CLIP model (PickScore_v1's ViT-H/14 for the real one)."""

    name = "PickScore"

    def forward_scores(self, pixel_values, input_ids, attention_mask):
        cosine = (self.image_embeds(pixel_values) * self.text_embeds(input_ids, attention_mask)).sum(-1)
        return self.model.logit_scale.float().exp() * cosine


def build_tiny(tokenizer=None) -> PickScoreScorer:
    """Random toy-size CLIP over `tokenizer` (default: the tiny CLIP BPE vocabulary)."""
    tok = clip_tokenizer(tokenizer)
    return PickScoreScorer(tiny_clip_config(tok), tok)


def load_saved(meta: dict, directory: Path) -> PickScoreScorer:
    """The architecture a `save_pretrained` directory describes (weights are loaded by the caller)."""
    from transformers import CLIPConfig

    return PickScoreScorer(CLIPConfig.from_dict(meta["clip_config"]), clip_tokenizer(directory))


def _tokenizer_for(model_source: str | os.PathLike, source: RealWeights):
    """`source.tokenizer`, else the model directory's own tokenizer files, else the processor repo's."""
    from rayapp.model.checkpoint import has_tokenizer_files

    if source.tokenizer is not None:
        return clip_tokenizer(source.tokenizer)
    if Path(model_source).is_dir() and has_tokenizer_files(model_source):
        return clip_tokenizer(model_source)
    return clip_tokenizer(PICKSCORE_PROCESSOR_REPO)


def load_official(directory: Path, source: RealWeights) -> PickScoreScorer:
    """A transformers `CLIPModel` directory in the hub repo's format (tokenizer: see `_tokenizer_for`)."""
    from transformers import CLIPModel

    if not Path(directory).is_dir():
        raise ValueError(f"{directory}: PickScore loads a transformers CLIPModel directory (config.json + weights)")
    model = CLIPModel.from_pretrained(os.fspath(directory), dtype=torch.float32)
    return PickScoreScorer(model.config, _tokenizer_for(directory, source), model=model)


def load_real(source: RealWeights) -> PickScoreScorer:
    """`source.clip_model` (default yuvalkirstain/PickScore_v1) with the laion ViT-H/14 processor's tokenizer."""
    from transformers import CLIPModel

    repo = source.clip_model or PICKSCORE_HUB_REPO
    model = CLIPModel.from_pretrained(repo, cache_dir=source.cache_dir, dtype=torch.float32)
    return PickScoreScorer(model.config, _tokenizer_for(repo, source), model=model)
