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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schedules import Schedule
from .base import Batch
from .graphs import GraphDiffusion


class UniformDiffusion(GraphDiffusion):
    family = "uniform"

    def __init__(
        self,
        vocab_size: int,
        mask_id: int,
        pad_id: int,
        bos_id: int | None = None,
        schedule: Schedule | str | dict = "loglinear",
        time_conditioning: bool = True,
        length_prior: list[float] | None = None,
    ) -> None:
        super().__init__(vocab_size, mask_id, pad_id, bos_id, "uniform", schedule, time_conditioning, length_prior)

    def x0_log_probs(self, model: nn.Module, xt: Tensor, t: Tensor) -> Tensor:
        """log p̃_θ(x0 | x_t): (B, L, V) float32, −inf on the ids that are never data."""
        logits = model(xt, t.float() if self.time_conditioning else None).float()
        logits[..., self.never] = -math.inf
        return F.log_softmax(logits, dim=-1)

    def log_score(self, model: nn.Module, xt: Tensor, t: Tensor) -> Tensor:
        """The concrete score the x0-prediction implies, log s_y: (B, L, V) float64."""
        return self.graph.exact_log_score_from_x0(self.x0_log_probs(model, xt, t), xt, self.schedule.alpha(t))

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        x0 = batch.tokens
        t, w = self.times(batch.time_uniforms(generator))
        xt = self.corrupt(batch, t, generator)
        log_p0 = self.x0_log_probs(model, xt, t)
        terms = self.graph.score_entropy_from_x0(log_p0, xt, x0, self.schedule.alpha(t)) * w[:, None]
        return torch.where(batch.loss_mask, terms, torch.zeros_like(terms)).float()

    def config(self) -> dict:
        return {"type": "uniform", "schedule": self.schedule.to_dict(), "time_conditioning": self.time_conditioning}
