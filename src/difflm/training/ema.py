"""Exponential moving average of the weights, used for evaluation and sampling."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """shadow ← d·shadow + (1−d)·θ with d = min(decay, (1+n)/(10+n)) so short runs are not dominated by
    the initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in model.named_parameters():
            self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the EMA weights into the model."""
        saved = {k: p.detach().clone() for k, p in model.named_parameters()}
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(self.shadow[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(saved[k])
