"""Documents -> fixed-length windows, as the paper packs them, and prompt/response pairs -> windows.

Packing (format=text): each document's tokens then EOS, concatenated into one stream and cut into
seq_len windows with no padding; a window may hold the end of one document and the start of the
next. The position where each document begins is kept, for document-masked attention. What does
not fill a shard of an input (its *rest*, up to its last partial window) is packed with the other
inputs' rests when the build merges (data_pipeline/merge.py), so only the last partial window of the
whole build is dropped (one per split).

SFT (format=sft): one window per pair, prompt + response + EOS, padded with EOS to seq_len (the
paper's SFT data: padding EOS is part of the response). A pair longer than seq_len is left out and
counted.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.shards import Block


class Packer:
    """Collects documents; `take(n)` returns n full windows and their document starts."""

    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len, self.eos_id = seq_len, eos_id
        self.parts: list[np.ndarray] = []
        self.starts: list[int] = []  # document starts, as positions in the stream since the last take
        self.length = 0
        self.prompt: list[int] = []  # per window (sft), empty for text

    def add_document(self, ids: list[int]) -> None:
        self.starts.append(self.length)
        self.parts.append(np.asarray(ids, dtype=np.uint32))
        self.parts.append(np.array([self.eos_id], dtype=np.uint32))
        self.length += len(ids) + 1

    def add_pair(self, prompt_ids: list[int], response_ids: list[int]) -> bool:
        """One sft window; False when prompt + response + EOS does not fit."""
        n = len(prompt_ids) + len(response_ids) + 1
        if n > self.seq_len:
            return False
        window = np.full(self.seq_len, self.eos_id, dtype=np.uint32)
        window[: n - 1] = prompt_ids + response_ids
        self.starts.append(self.length)
        self.parts.append(window)
        self.length += self.seq_len
        self.prompt.append(len(prompt_ids))
        return True

    def extend(self, state: dict[str, np.ndarray]) -> None:
        """Appends a stream saved by `state()` (another packer's rest) after what this one holds."""
        tokens = np.asarray(state["tokens"])
        self.starts += [self.length + int(x) for x in state["starts"]]
        if len(tokens):
            self.parts.append(tokens.astype(np.uint32))
            self.length += len(tokens)
        self.prompt += [int(x) for x in state["prompt"]]

    def add_block(self, block: Block) -> None:
        """Appends the windows of a block read back from a shard."""
        self.extend({"tokens": block.tokens.ravel(), "starts": block.starts,
                     "prompt": block.prompt if block.prompt is not None else []})

    def full_windows(self) -> int:
        return self.length // self.seq_len

    def take(self, n: int, key: str, dtype: np.dtype) -> Block:
        """The first n full windows as a Block; what is left stays for the next take."""
        flat = np.concatenate(self.parts) if len(self.parts) != 1 else self.parts[0]
        used = n * self.seq_len
        tokens = flat[:used].astype(dtype).reshape(n, self.seq_len)
        starts = np.array([s for s in self.starts if s < used], dtype=np.uint32)
        rest = flat[used:]
        self.parts = [rest] if len(rest) else []
        self.starts = [s - used for s in self.starts if s >= used]
        self.length -= used
        prompt = None
        if self.prompt:
            prompt, self.prompt = np.array(self.prompt[:n], dtype=np.uint32), self.prompt[n:]
        return Block(key, tokens, starts, prompt)

    # -- resume ---------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """What is left in the packer (less than a block), as arrays for an .npz."""
        flat = np.concatenate(self.parts) if self.parts else np.empty(0, np.uint32)
        return {"tokens": flat.astype(np.uint32), "starts": np.array(self.starts, dtype=np.int64),
                "prompt": np.array(self.prompt, dtype=np.int64)}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        tokens = state["tokens"]
        self.parts = [tokens] if len(tokens) else []
        self.length = len(tokens)
        self.starts = [int(x) for x in state["starts"]]
        self.prompt = [int(x) for x in state["prompt"]]
