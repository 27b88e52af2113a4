"""Hugging Face `tokenizers` tokenizers: train a byte-level BPE, or load a tokenizer.json, with the
two special tokens a diffusion LM needs: EOS (ends each packed document) and MASK (the noise)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"


def train_bpe(documents: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, MASK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer)
    return tok


def ensure_special_tokens(tok: Tokenizer) -> Tokenizer:
    """Adds EOS and MASK when the tokenizer lacks them (ids appended after the vocabulary)."""
    missing = [t for t in (EOS, MASK) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return ensure_special_tokens(Tokenizer.from_file(str(path)))


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {"eos_id": tok.token_to_id(EOS), "mask_id": tok.token_to_id(MASK)}


def fingerprint(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
