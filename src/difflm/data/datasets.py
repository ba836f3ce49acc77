"""Token datasets: a corpus tokenized once into a memory-mapped (N, L) int32 array.

packed: the lines, each followed by [EOS], concatenated and cut into blocks of L tokens (no padding);
lines:  one line per row, then [EOS], then [PAD] up to L; padding is excluded from every loss. The
        length (where [EOS] and the padding are) is given to diffusion models, which pay for it with a
        length prior −log p(n); so [EOS] and [PAD] are fixed (never noised) in this mode.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..diffusion.base import Batch
from ..errors import DiffLMError
from .corpora import load_lines
from .tokenizers import Tokenizer

MODES = ("packed", "lines")


def cache_root(cfg) -> Path:
    return Path(cfg.cache_dir or os.environ.get("DIFFLM_CACHE") or Path.home() / ".cache" / "difflm")


class TokenDataset:
    """Rows of token ids (N, L), int32, usually a read-only memory map."""

    def __init__(self, tokens: np.ndarray, pad_id: int, mode: str, eos_id: int) -> None:
        self.tokens, self.pad_id, self.mode, self.eos_id = tokens, pad_id, mode, eos_id

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def batch(self, idx) -> Batch:
        """Rows idx (a sequence of ints) as a Batch."""
        x = torch.from_numpy(np.asarray(self.tokens[np.asarray(idx)], dtype=np.int64))
        return make_batch(x, self.pad_id, self.eos_id, self.mode)

    def n_tokens(self) -> int:
        return int((np.asarray(self.tokens) != self.pad_id).sum())

    def length_counts(self) -> np.ndarray:
        """counts[n] = number of rows with n non-padding tokens, n = 0..L."""
        n = (np.asarray(self.tokens) != self.pad_id).sum(1)
        return np.bincount(n, minlength=self.seq_len + 1)


def make_batch(x: torch.Tensor, pad_id: int, eos_id: int, mode: str) -> Batch:
    """Batch of rows x (B, L): padding is never modelled; in lines mode [EOS] and [PAD] are fixed."""
    pad = x == pad_id
    fixed = (pad | (x == eos_id)) if mode == "lines" else torch.zeros_like(pad)
    return Batch(x, ~pad, fixed)


def _rows(tokenizer: Tokenizer, lines: list[str], mode: str, L: int) -> tuple[np.ndarray, int]:
    ids = tokenizer.encode_lines(lines)
    eos = tokenizer.eos_id
    if mode == "packed":
        stream = np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=np.int32)
        n = len(stream) // L
        if n == 0:
            raise DiffLMError(
                f"the corpus has {len(stream)} tokens, fewer than one block of data.seq_len={L}; "
                "use more text or a smaller seq_len"
            )
        return stream[: n * L].reshape(n, L), 0
    if mode == "lines":
        out = np.full((len(ids), L), tokenizer.pad_id, dtype=np.int32)
        truncated = 0
        for i, seq in enumerate(ids):
            seq = [*seq, eos]
            if len(seq) > L:
                truncated += 1
                seq = seq[:L]
            out[i, : len(seq)] = seq
        return out, truncated
    raise DiffLMError(f"unknown data.mode {mode!r}; choose one of {', '.join(MODES)}")


def build_dataset(cfg, tokenizer: Tokenizer, split: str) -> TokenDataset:
    """cfg: DataConfig. Tokenizes the split once and memory-maps the result from the cache."""
    lines = load_lines(cfg, split)
    h = hashlib.sha256()
    h.update(json.dumps([cfg.mode, cfg.seq_len, tokenizer.hf.to_str()]).encode())
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    root = cache_root(cfg)
    path = root / f"{split}-{h.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.ndim == 2 and arr.shape[1] == cfg.seq_len:
                return TokenDataset(arr, tokenizer.pad_id, cfg.mode, tokenizer.eos_id)
        except (ValueError, OSError):
            pass  # a damaged cache file is rebuilt below
    rows, truncated = _rows(tokenizer, lines, cfg.mode, cfg.seq_len)
    if truncated:
        print(f"difflm: {truncated} {split} lines longer than data.seq_len={cfg.seq_len} were truncated")
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, rows)
    os.replace(tmp, path)
    return TokenDataset(np.load(path, mmap_mode="r"), tokenizer.pad_id, cfg.mode, tokenizer.eos_id)
