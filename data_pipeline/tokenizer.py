"""Hugging Face `tokenizers` tokenizers: train a byte-level BPE on a corpus, or load any
tokenizer.json, with the two special tokens a diffusion LM needs: EOS (ends each packed document,
pads SFT responses) and MASK (the noise). Either is added when a loaded tokenizer lacks it.

A source model's tokenizer (a warm start, pretrain/hf/causal_import.py) keeps its own end-of-text
token (`EOS_NAMES`: Llama 3's <|end_of_text|>, Llama 2's </s>), and a token it reserves unused
(Llama 3's <|reserved_special_token_N|>, the lowest id) serves as MASK, so that no row of the source's
embedding has to be added; a diffusion LM's tokenizer keeps its own (LLaDA-MoE's <|mask|>, with its trained
rows); only a tokenizer with none of these gets MASK appended.

    python -m data_pipeline.tokenizer OUT.json data=files data.inputs=[corpus/] data.vocab_size=32000
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
DIFFUSION_MASKS = (MASK, "<|mask|>")  # a diffusion LM's own mask token: LLaDA's; LLaDA-MoE's and LLaDA 2.0's
EOS_NAMES = (EOS, "<|end_of_text|>", "</s>")  # the first one a tokenizer has is its EOS
RESERVED = re.compile(r"<\|reserved_special_token_\d+\|>")  # Llama 3's names for unused special tokens
# A document longer than this is tokenized a segment at a time: `tokenizers` needs some 100-200 bytes
# of memory per character of one encode() call (a 50 MB document took 10 GB).
SEGMENT_CHARS = 1 << 18


def train_bpe(documents, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, MASK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer)
    return tok


def segments(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of at most about `size` characters, cut only at a single space between two
    non-space characters. A pre-tokenizer that splits words at spaces (byte-level BPE's, GPT-2 or
    Llama style) has a boundary there whatever the context, so the tokens of the pieces, joined, are
    the tokens of the whole. A run of `size` characters without such a space is cut where it ends (a
    few tokens there may differ)."""
    start = 0
    while len(text) - start > size:
        limit = start + size
        cut = text.rfind(" ", start + 1, limit)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else limit
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_document(tok: Tokenizer, text: str) -> list[int] | np.ndarray:
    """The token ids of one document, in memory bounded by SEGMENT_CHARS whatever its length."""
    if len(text) <= SEGMENT_CHARS:
        return tok.encode(text, add_special_tokens=False).ids
    parts = [np.asarray(tok.encode(piece, add_special_tokens=False).ids, dtype=np.uint32)
             for piece in segments(text, SEGMENT_CHARS)]
    return np.concatenate(parts)


def corpus_texts(files: list[str], cfg) -> Iterator[str]:
    """Every text of the inputs (prompt and response separately for format=sft); a long one in
    segments (the trainer counts the same words)."""
    from data_pipeline.sources import DocumentReader

    for path in files:
        for record in DocumentReader(path, cfg.format, cfg.text_field, cfg.prompt_field, cfg.response_field,
                                     cfg.on_decode_error):
            for text in [record] if isinstance(record, str) else record:
                yield from segments(text, SEGMENT_CHARS)


def train_on_inputs(files: list[str], cfg, vocab_size: int) -> Tokenizer:
    return train_bpe(corpus_texts(files, cfg), vocab_size)


def eos_token(tok: Tokenizer) -> str:
    return next((name for name in EOS_NAMES if tok.token_to_id(name) is not None), EOS)


def mask_token(tok: Tokenizer) -> str:
    """A diffusion LM's own mask token if the tokenizer has one (DIFFUSION_MASKS, in that order), else its
    lowest reserved special token, else MASK (to be added)."""
    for token in DIFFUSION_MASKS:
        if tok.token_to_id(token) is not None:
            return token
    reserved = [(i, t.content) for i, t in tok.get_added_tokens_decoder().items() if RESERVED.fullmatch(t.content)]
    return min(reserved)[1] if reserved else MASK


def ensure_special_tokens(tok: Tokenizer) -> Tokenizer:
    """Adds EOS and MASK when the tokenizer lacks them (ids appended after the vocabulary)."""
    missing = [t for t in (eos_token(tok), mask_token(tok)) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok


TOKENIZER_MAX_BYTES = 512 << 20  # a tokenizer.json of a very large vocabulary is tens of MB


def load_tokenizer(path: str | Path, root: str | Path | None = None) -> Tokenizer:
    """A Hugging Face tokenizer.json, read through data_pipeline/confined.py: a regular file, size-capped,
    and with `root` (the tokenizer of a data.dir) inside that root after realpath. Without one (a file
    the user named, e.g. in a Hugging Face cache whose files are symlinks) only the first two hold."""
    from data_pipeline.confined import UnsafeFileError, read_capped
    from data_pipeline.shards import DataError

    path = Path(path)
    if root is None:
        root, name = os.path.split(os.path.realpath(path))
    else:
        name = os.path.relpath(path, root)
    try:
        text = read_capped(root, name, TOKENIZER_MAX_BYTES).decode()
    except FileNotFoundError:
        raise DataError(f"tokenizer file not found: {path}") from None
    except UnsafeFileError as e:
        raise DataError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a Hugging Face tokenizer.json ({type(e).__name__})") from None
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
    return ensure_special_tokens(tok)


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {"eos_id": tok.token_to_id(eos_token(tok)), "mask_id": tok.token_to_id(mask_token(tok))}


def fingerprint(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def main(argv: list[str]) -> None:
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from data_pipeline.cli import add_overrides, parser
    from data_pipeline.config import compose
    from data_pipeline.shards import DataError, atomic_write
    from data_pipeline.sources import resolve_inputs

    p = parser("data_pipeline.tokenizer", __doc__, "Reads data.inputs, data.format, data.text_field, "
               "data.prompt_field, data.response_field, data.on_decode_error and data.vocab_size "
               "(see python -m data_pipeline.build --help).")
    p.add_argument("out", metavar="OUT.json", help="where the tokenizer.json is written")
    add_overrides(p)
    args = p.parse_args(argv)
    if "=" in args.out:
        p.error(f"the first argument is the output file, got the override {args.out!r}")
    out, overrides = Path(args.out), args.overrides
    keys = ("inputs", "format", "text_field", "prompt_field", "response_field", "on_decode_error", "vocab_size")
    try:
        try:  # only the keys that say what to read: data.dir and the rest are not needed here
            data = compose(overrides).data
            cfg = SimpleNamespace(**{k: OmegaConf.to_object(data[k]) if OmegaConf.is_config(data[k]) else data[k]
                                     for k in keys})
        except OmegaConfBaseException as e:
            raise DataError(f"config: {str(e).splitlines()[0]}") from None
        tok = train_on_inputs(resolve_inputs(cfg.inputs), cfg, cfg.vocab_size)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, tok.to_str())
    print(f"{out}: vocabulary {tok.get_vocab_size()} (EOS {special_ids(tok)['eos_id']}, "
          f"MASK {special_ids(tok)['mask_id']}), fingerprint {fingerprint(tok)}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
