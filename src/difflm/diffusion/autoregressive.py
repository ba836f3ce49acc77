"""The autoregressive baseline as a process: exact NLL, −Σ log p(xⁱ | x<ⁱ), through the same interface.

The input is the sequence shifted right behind [BOS], so every position of a block — the first one too —
is predicted, and the AR model scores exactly the tokens a diffusion model scores on the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Batch, Process


class Autoregressive(Process):
    family = "autoregressive"
    exact_likelihood = True

    def __init__(self, bos_id: int, pad_id: int, mask_id: int | None = None) -> None:
        super().__init__()
        self.bos_id, self.pad_id = bos_id, pad_id
        self.never = [i for i in (bos_id, pad_id, mask_id) if i is not None]  # ids that are never data

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """Next-token logits at every position, float32, with [BOS]/[PAD]/[MASK] ruled out: (B, L, V)."""
        logits = model(self.shift_right(x)).float()
        logits[..., self.never] = float("-inf")
        return logits

    def shift_right(self, x: Tensor) -> Tensor:
        """(B, L) -> (B, L): [BOS], x₀, …, x_{L−2}."""
        bos = torch.full_like(x[:, :1], self.bos_id)
        return torch.cat([bos, x[:, :-1]], dim=1)

    def log_probs(self, model: nn.Module, x: Tensor) -> Tensor:
        """log p(xⁱ | x<ⁱ) over the vocabulary at every position: (B, L, V) float32."""
        return F.log_softmax(self.logits(model, x), dim=-1)

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        logits = self.logits(model, batch.tokens)
        nll = F.cross_entropy(logits.transpose(1, 2), batch.tokens, reduction="none")
        return torch.where(batch.loss_mask, nll, torch.zeros_like(nll))

    def config(self) -> dict:
        return {"type": "autoregressive"}
