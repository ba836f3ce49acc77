"""The autoregressive baseline as a process: exact NLL, −Σ log p(xⁱ | x<ⁱ), through the same interface.

The input is the sequence shifted right behind [BOS], so every position of a block — the first one too —
is predicted, and the AR model scores exactly the tokens a diffusion model scores on the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffLMError
from ..registry import BackboneNeeds, NoOptions, register_family
from .base import Batch, Process


@register_family
class Autoregressive(Process):
    """The constructor is every process's: (vocab_size, mask_id, pad_id, bos_id); it needs a [BOS]."""

    family = "autoregressive"
    Options = NoOptions
    default_sampler = "autoregressive"
    exact_likelihood = True
    # the length is modelled by [EOS] like any token (lines mode): no length prior is drawn or added
    generates_length = True
    input_shift = 1  # the network reads [BOS] + x: row position i sits at input position i + 1

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, **kw) -> None:
        super().__init__(vocab_size, mask_id, pad_id, bos_id, **kw)
        if bos_id is None:
            raise DiffLMError("the autoregressive baseline needs a tokenizer with a [BOS] token")

    def backbone_needs(self) -> BackboneNeeds:
        return BackboneNeeds(attention="causal")

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
        """−log p(xⁱ | x<ⁱ) at the modelled positions (B, L), 0 elsewhere. The output head runs only there (a
        seq2seq row's source, and padding, cost no (V)-wide logits)."""
        sel = batch.loss_mask
        logits = model(self.shift_right(batch.tokens), select=sel).float()
        logits[..., self.never] = float("-inf")
        terms = torch.zeros(batch.tokens.shape, dtype=torch.float32, device=batch.tokens.device)
        terms[sel] = F.cross_entropy(logits, batch.tokens[sel], reduction="none")
        return terms
