"""The BLIP text tokenizer: bert-base-uncased plus `[DEC]` (bos) and `[ENC]` -> 30524 ids."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

BERT_HUB_NAME = "bert-base-uncased"
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: pad id 0


def add_blip_special_tokens(tokenizer):
    """Add `[DEC]` as bos and `[ENC]` as an extra special token, as BLIP does (idempotent)."""
    if tokenizer.bos_token != "[DEC]":
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_tokenizer(name_or_dir: str | os.PathLike = BERT_HUB_NAME):
    """Load a BERT WordPiece tokenizer from a directory or the Hugging Face hub/cache, with BLIP's tokens.

    Hub names go through the Hugging Face cache, so `HF_HOME` and `HF_HUB_OFFLINE=1` behave as usual.
    """
    from transformers import BertTokenizer

    try:
        tokenizer = BertTokenizer.from_pretrained(os.fspath(name_or_dir))
    except OSError as err:
        from huggingface_hub import constants

        hint = (
            " HF_HUB_OFFLINE is set and no cached copy was found; run once online or pass tokenizer=."
            if constants.HF_HUB_OFFLINE
            else " Check the name, your network, or pass tokenizer= / a saved model directory."
        )
        raise OSError(f"cannot load the tokenizer {os.fspath(name_or_dir)!r}.{hint}") from err
    return add_blip_special_tokens(tokenizer)


def build_wordpiece_tokenizer(words: Iterable[str], save_dir: str | os.PathLike | None = None):
    """A small lower-case WordPiece tokenizer over `words` (for the tiny preset and synthetic captions)."""
    from transformers import BertTokenizer

    vocab: dict[str, int] = {}
    for token in (*BERT_SPECIAL_TOKENS, *sorted({w.lower() for w in words})):
        vocab.setdefault(token, len(vocab))
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":  # unseen words still split to something
        vocab.setdefault(char, len(vocab))
        vocab.setdefault("##" + char, len(vocab))
    tokenizer = add_blip_special_tokens(BertTokenizer(vocab=vocab, do_lower_case=True))
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer
