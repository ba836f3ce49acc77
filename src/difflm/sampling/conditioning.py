"""Which positions are given: shared by every family and sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """tokens: (B, L) given tokens (anything where not fixed); fixed: (B, L) True where a token is given
    and must come out unchanged (prefix, suffix, spans, padding, a seq2seq source); images: (B, C, H, W) the
    images captioning rows describe (read by the encoder; no sampler touches them)."""

    tokens: Tensor
    fixed: Tensor
    images: Tensor | None = None

    @classmethod
    def unconditional(cls, batch: int, length: int, fill: int = 0, device="cpu") -> Conditioning:
        return cls(
            torch.full((batch, length), fill, dtype=torch.long, device=device),
            torch.zeros(batch, length, dtype=torch.bool, device=device),
        )

    @classmethod
    def prefix(cls, prompts: list[list[int]], length: int, fill: int = 0) -> Conditioning:
        """Each row starts with its prompt; the rest is generated."""
        cond = cls.unconditional(len(prompts), length, fill)
        for i, p in enumerate(prompts):
            cond.tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            cond.fixed[i, : len(p)] = True
        return cond

    def initial(self, fill: int) -> Tensor:
        """The sampler's starting state (B, L): the given tokens, ``fill`` (e.g. [MASK]) everywhere else."""
        return torch.where(self.fixed, self.tokens, torch.full_like(self.tokens, fill))

    def rows(self, idx: Tensor | slice) -> Conditioning:
        return Conditioning(self.tokens[idx], self.fixed[idx], None if self.images is None else self.images[idx])

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(self.tokens.to(device), self.fixed.to(device),
                            None if self.images is None else self.images.to(device))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def prefix_length(self) -> int:
        """The number of leading positions given in every row (what a left-to-right decoder reads in one call)."""
        return int(self.fixed.long().cumprod(-1).sum(-1).min()) if self.fixed.numel() else 0

    def is_prefix_only(self) -> bool:
        """True when every row's fixed positions form a prefix: a continuation, with no given text after a gap."""
        f = self.fixed.long()
        return bool((f[:, 1:] <= f[:, :-1]).all())
