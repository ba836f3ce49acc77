"""Categorical sampling in float64 by inverse CDF, with temperature and nucleus (top-p) filtering.

Float64 throughout: float32 Gumbel noise lowers the effective temperature (a flaw of several reference
samplers); here every draw is exact to ~2⁻⁵³.
"""

from __future__ import annotations

import torch
from torch import Tensor


def probs_from_logits(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """(…, V) logits or log-probs -> float64 probabilities after temperature and nucleus filtering."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    logits = logits.double() / temperature
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    return probs


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches top_p (Holtzman et al. 2020)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)


def sample_categorical(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw: probs (…, V) ≥ 0 (need not sum to 1), u (…) uniforms in [0,1) -> (…) long."""
    cdf = probs.double().cumsum(-1)
    x = (u.double() * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)
