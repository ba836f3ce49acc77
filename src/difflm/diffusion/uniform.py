"""Uniform-noise diffusion in continuous time (UDLM, Schiff et al. 2024, arXiv 2412.10193; DUO, Sahoo et
al. 2025, arXiv 2506.10892).

Forward: each token is resampled uniformly over the N data tokens with probability 1 − α(t):
q(x_t | x0) = Cat(α x0 + (1 − α)/N). Network: an x0-prediction p̃_θ(· | x_t) over the data tokens
(time-conditioned: unlike masking, a noisy token does not say it is noisy). The reverse posterior plugs p̃
into q(x_s | x_t, x0) — D3PM's x0-parameterization — whose continuous-time limit is the concrete score

    s_y = x̄_y / x̄_{x_t},   x̄ = α p̃ + (1 − α)/N                                   (UDLM eq. 15)

and the exact NELBO is the score-entropy integral of graphs.py with that score (UDLM eq. 18 in the form
of SEDD Thm 3.6). With α(1) = 0 the prior term vanishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import option, register_family
from .base import Batch
from .graphs import GraphDiffusion


@dataclass
class UniformOptions:
    schedule: str | dict = option("loglinear", "α(t) (as process.type masked)")
    time_conditioning: bool = option(True, "feed t to the network: a noisy token does not say it is noisy")


@register_family
class UniformDiffusion(GraphDiffusion):
    family = "uniform"
    Options = UniformOptions
    default_sampler = "ancestral"

    def log_probs(self, model: nn.Module, xt: Tensor, t: Tensor, select: Tensor | None = None) -> Tensor:
        """log p̃_θ(x0 | x_t): (B, L, V) float32, or (N, V) where ``select`` is True; −inf on the ids that are
        never data."""
        tc = t.float() if self.time_conditioning else None
        logits = (model(xt, tc) if select is None else model(xt, tc, select=select)).float()
        logits[..., self.never] = -math.inf
        return F.log_softmax(logits, dim=-1)

    def log_score(self, model: nn.Module, xt: Tensor, t: Tensor) -> Tensor:
        """The concrete score the x0-prediction implies, log s_y: (B, L, V) float64."""
        return self.graph.exact_log_score_from_x0(self.log_probs(model, xt, t), xt, self.schedule.alpha(t))

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        x0 = batch.tokens
        t, w = self.times(batch.time_uniforms(generator))
        xt = self.corrupt(batch, t, generator)
        log_p0 = self.log_probs(model, xt, t)
        terms = self.graph.score_entropy_from_x0(log_p0, xt, x0, self.schedule.alpha(t)) * w[:, None]
        return torch.where(batch.loss_mask, terms, torch.zeros_like(terms)).float()
