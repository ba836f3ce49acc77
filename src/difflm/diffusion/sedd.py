"""Score entropy discrete diffusion (SEDD, Lou et al. ICML 2024, arXiv 2310.16834).

The network outputs log concrete scores log s_θ(x_t, t)_y ≈ log p_t(x_t with token i set to y) / p_t(x_t)
for every position i and token y. The loss is the denoising score entropy with its constant term, which
makes it the continuous-time NELBO (Thm 3.6; graphs.py has the formula):

    −log p(x0) ≤ ∫₀¹ σ(t) Σ_i Σ_{y≠x_tⁱ} π_{x_tⁱ} [ s_y − r_y log s_y + K(r_y) ] dt     (α(1) = 0: no prior term)

"Scale by σ" (SEDD §5 / their model code), absorbing graph only: the network's output h is offset so that
log s_y = h_y − log N − log((1−α)/α), i.e. h ≈ log p(x0 = y | x_t) + log N is O(1) at every noise level.
The score of the token a position already holds is fixed to 1 (log 0) and never predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..registry import option, register_family
from .base import Batch
from .graphs import Graph, GraphDiffusion


@dataclass
class SEDDOptions:
    graph: Literal["absorb", "uniform"] = option("absorb", "the forward CTMC's graph")
    schedule: str | dict = option("loglinear", "α(t) = exp(−σ̄(t)) (as process.type masked; SEDD's geometric too)")
    scale_by_sigma: bool = option(True, "absorbing graph: offset the output by log N + log((1−α)/α) (SEDD §5)")
    time_conditioning: bool = option(True, "feed t to the network (adaLN)")


@register_family
class ScoreEntropy(GraphDiffusion):
    family = "sedd"
    Options = SEDDOptions
    default_sampler = "analytic"

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, **kw) -> None:
        super().__init__(vocab_size, mask_id, pad_id, bos_id, **kw)
        self.scale_by_sigma = bool(self.options.scale_by_sigma) and self.graph.absorb

    def graph_kind(self) -> str:
        return self.options.graph

    def log_score(self, model: nn.Module, xt: Tensor, t: Tensor, select: Tensor | None = None) -> Tensor:
        """log s_θ(x_t, t): (B, L, V) float32, or (N, V) where ``select`` is True; −inf on the ids that are
        never data (so −inf at [MASK]), and 0 at the token a position holds (uniform graph). For the absorbing
        graph only [MASK] positions have a score (the others never move); ``select`` should be a subset."""
        tc = t.float() if self.time_conditioning else None
        out = (model(xt, tc) if select is None else model(xt, tc, select=select)).float()
        out[..., self.never] = -math.inf
        if self.scale_by_sigma:
            a = self.schedule.alpha(t.double())
            shift = (math.log(self.graph.N) + torch.log((1 - a) / a)).float()[:, None]  # (B, 1)
            shift = shift.expand_as(xt)[select] if select is not None else shift
            out = out - shift[..., None]
        if self.graph.absorb:  # y ranges over data tokens only; [MASK] stays at −inf
            return out
        held = xt[select] if select is not None else xt
        return out.scatter(-1, held[..., None], 0.0)

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        x0 = batch.tokens
        t, w = self.times(batch.time_uniforms(generator))
        xt = self.corrupt(batch, t, generator)
        a = self.schedule.alpha(t)
        terms = torch.zeros(x0.shape, dtype=torch.float64, device=x0.device)
        if self.graph.absorb:  # only masked positions have terms: run the head there only
            sel = (xt == self.mask_id) & batch.loss_mask
            log_s = self.log_score(model, xt, t, select=sel)  # (n, V)
            r = (a / (1 - a))[:, None].expand_as(xt)[sel]
            h = log_s.double() - torch.log(r)[:, None]  # s = r·e^h
            vals = Graph.absorb_score_entropy(h, x0[sel], r, torch.ones_like(r, dtype=torch.bool))
            terms[sel] = vals * w[:, None].expand_as(xt)[sel]
        else:
            log_s = self.log_score(model, xt, t)
            terms = self.graph.score_entropy(log_s, xt, x0, a) * w[:, None]
            terms = torch.where(batch.loss_mask, terms, torch.zeros_like(terms))
        return terms.float()
