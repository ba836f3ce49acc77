"""Gaussian diffusion on learned token embeddings (Diffusion-LM, Li et al. 2022, arXiv 2205.14217).

Each token w has a learned embedding e_w ∈ R^d (the model's ``embed`` table; unit-variance at init).
Forward (variance preserving):  z_t = √ᾱ(t)·e + √(1 − ᾱ(t))·ε,   t ∈ [0, 1],   SNR(t) = ᾱ/(1 − ᾱ).
Schedules ᾱ(t): ``linear`` (DDPM's linear β in continuous time, β(t) from 0.1 to 20), ``cosine``
(Nichol & Dhariwal 2021), ``sqrt`` (Diffusion-LM: ᾱ = 1 − √(t + s)). Each keeps SNR(0) finite, so the
decoder at t = 0 is a proper likelihood.

The network predicts x̂0(z_t, t) (x0-parameterisation). The NELBO per position, in nats (VDM, Kingma et al.
2021, eqs. 11–17, with the embedding as the continuous data):
    −log p(w) ≤ KL(q(z_1|e) ‖ N(0, I))                           prior
              + ½ ∫_0^1 −SNR'(t) ‖e − x̂0(z_t, t)‖² dt           diffusion (one t per row, uniform)
              + E_{q(z_0|e)} [−log p(w | z_0)]                       rounding
with the rounding decoder tied to the embeddings: p(w | z_0) ∝ exp(−SNR(0)/2 · ‖z_0/√ᾱ(0) − e_w‖²), i.e. the
Bayes decoder of the t = 0 Gaussian (logits SNR(0)·(ẑ·e_w − ‖e_w‖²/2)).
Training (``loss``): ``simple`` is Diffusion-LM's L_simple — ‖e − x̂0‖² at a uniform t (at t → 0 this is the
embedding loss at t = 0), plus ‖√ᾱ(1)·e‖² (the prior's mean term) and the rounding cross-entropy; ``elbo``
trains on the bound itself. ``t0_weight`` w adds Diffusion-LM's t = 0 embedding loss explicitly,
w·‖e − x̂0(z_0, 0)‖² (§4.1, L_e2e), without a second forward pass: a share w/(1+w) of the rows is put at
t = 0 and every row's MSE is scaled by 1 + w, an unbiased estimate of E_t‖e − x̂0‖² + w·‖e − x̂0(z_0, 0)‖².
(Diffusion-LM's code puts t = 0 with probability 1/T, i.e. w = 1/T; the default 0 leaves it to the t → 0 end.)
Self-conditioning (Chen et al., Analog Bits): with probability ½ the network
first predicts x̂0 with a zero input, and that (detached) prediction is fed back; evaluation always uses the
two-pass prediction, a deterministic function of z_t, so the bound stays a bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffLMError
from ..registry import BackboneNeeds, option, register_family
from .base import Batch, Process


class GaussianSchedule:
    """ᾱ(t) and dᾱ/dt for t ∈ [0, 1], float64."""

    name = "base"

    def alpha_bar(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha_bar_prime(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def snr(self, t: Tensor) -> Tensor:
        a = self.alpha_bar(t)
        return a / (1 - a)

    def snr_prime(self, t: Tensor) -> Tensor:
        return self.alpha_bar_prime(t) / (1 - self.alpha_bar(t)) ** 2


class LinearVP(GaussianSchedule):
    """ᾱ(t) = exp(−∫_0^τ β),  β(τ) = β0 + (β1 − β0)τ,  τ = s + (1 − s)t (s keeps SNR(0) finite)."""

    name = "linear"

    def __init__(self, beta0: float = 0.1, beta1: float = 20.0, s: float = 1e-3) -> None:
        self.b0, self.b1, self.s = beta0, beta1, s

    def _tau(self, t: Tensor) -> Tensor:
        return self.s + (1 - self.s) * t.double()

    def alpha_bar(self, t: Tensor) -> Tensor:
        tau = self._tau(t)
        return torch.exp(-(self.b0 * tau + 0.5 * (self.b1 - self.b0) * tau**2))

    def alpha_bar_prime(self, t: Tensor) -> Tensor:
        tau = self._tau(t)
        return -self.alpha_bar(t) * (self.b0 + (self.b1 - self.b0) * tau) * (1 - self.s)


class CosineVP(GaussianSchedule):
    """ᾱ(t) = cos²(π/2 · (t + s)/(1 + s)) (Nichol & Dhariwal 2021, eq. 17, without the normalisation that
    would make ᾱ(0) = 1), floored at 1e-9 so that the prior term stays finite."""

    name = "cosine"

    def __init__(self, s: float = 0.008) -> None:
        self.s = s

    def alpha_bar(self, t: Tensor) -> Tensor:
        return torch.cos(math.pi / 2 * (t.double() + self.s) / (1 + self.s)) ** 2 * (1 - 1e-9) + 1e-9

    def alpha_bar_prime(self, t: Tensor) -> Tensor:
        x = math.pi / 2 * (t.double() + self.s) / (1 + self.s)
        return -torch.sin(2 * x) * (math.pi / 2 / (1 + self.s)) * (1 - 1e-9)


class SqrtVP(GaussianSchedule):
    """Diffusion-LM's ᾱ(t) = 1 − √(t + s), rescaled to reach 1e-4 at t = 1: ᾱ = 1 − (1 − 1e-4)·√((t + s)/(1 + s))."""

    name = "sqrt"

    def __init__(self, s: float = 1e-4) -> None:
        self.s = s

    def alpha_bar(self, t: Tensor) -> Tensor:
        return 1 - (1 - 1e-4) * torch.sqrt((t.double() + self.s) / (1 + self.s))

    def alpha_bar_prime(self, t: Tensor) -> Tensor:
        return -(1 - 1e-4) * 0.5 / torch.sqrt((t.double() + self.s) * (1 + self.s))


GAUSSIAN_SCHEDULES = {c.name: c for c in (LinearVP, CosineVP, SqrtVP)}


def gaussian_noise(u: Tensor) -> Tensor:
    """Standard normals from uniforms in [0, 1) by the inverse CDF (float64), so noise can be keyed on rows."""
    return math.sqrt(2) * torch.erfinv(2 * u.clamp(1e-15, 1 - 1e-15) - 1)


@dataclass
class GaussianOptions:
    schedule: Literal["sqrt", "cosine", "linear"] = option("sqrt", "ᾱ(t): sqrt (Diffusion-LM), cosine or linear")
    loss: Literal["simple", "elbo"] = option("simple", "train on L_simple or on the bound itself")
    embed_dim: int = option(64, "d, the dimension of the learned token embeddings", ge=1)
    self_conditioning: bool = option(False, "feed the previous x̂0 back as a second input (Analog Bits)")
    clamp: bool = option(False, "samplers snap each x̂0 to the nearest embedding by default")
    t0_weight: float = option(0.0, "w: add Diffusion-LM's t = 0 embedding loss w·‖e − x̂0(z_0, 0)‖² (loss: simple)",
                              ge=0)


@register_family
class GaussianDiffusion(Process):
    family = "gaussian"
    Options = GaussianOptions
    default_sampler = "ddpm"
    time_conditioning = True

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, **kw) -> None:
        super().__init__(vocab_size, mask_id, pad_id, bos_id, **kw)
        o = self.options
        schedule, loss, t0_weight = o.schedule, o.loss, o.t0_weight
        if not (t0_weight >= 0 and math.isfinite(t0_weight)):
            raise DiffLMError(f"process.t0_weight must be a finite number ≥ 0, got {t0_weight!r}")
        if t0_weight > 0 and loss != "simple":
            raise DiffLMError("process.t0_weight adds Diffusion-LM's t = 0 embedding loss to loss: simple; "
                              "the elbo loss is the bound itself — set loss: simple or drop t0_weight")
        self.t0_weight = float(t0_weight)
        if schedule not in GAUSSIAN_SCHEDULES:
            raise DiffLMError(f"unknown gaussian schedule {schedule!r}; choose one of {', '.join(GAUSSIAN_SCHEDULES)}")
        if loss not in ("simple", "elbo"):
            raise DiffLMError(f"process.loss must be simple or elbo, got {loss!r}")
        self.schedule_name, self.loss_type = schedule, loss
        self.schedule = GAUSSIAN_SCHEDULES[schedule]()
        self.embed_dim, self.self_conditioning, self.clamp = int(o.embed_dim), bool(o.self_conditioning), bool(o.clamp)

    def backbone_needs(self) -> BackboneNeeds:
        return BackboneNeeds(time_conditioning=True, d_embed=self.embed_dim, self_conditioning=self.self_conditioning)

    # -- embeddings and decoder ------------------------------------------------------------------
    @staticmethod
    def embeddings(model: nn.Module) -> Tensor:
        """The learned token embeddings (V, d)."""
        return model.embed.weight

    def decoder_logits(self, model: nn.Module, z0: Tensor) -> Tensor:
        """log p(w | z_0) up to a constant, float64 (..., V): the Bayes decoder of the t = 0 Gaussian."""
        E = self.embeddings(model).double()
        a0 = self.schedule.alpha_bar(torch.zeros((), dtype=torch.float64))
        snr0 = a0 / (1 - a0)
        zhat = z0.double() / torch.sqrt(a0)
        logits = snr0 * (zhat @ E.T - 0.5 * (E * E).sum(-1))
        logits[..., self.never] = -math.inf
        return logits

    def nearest_embedding(self, model: nn.Module, x: Tensor) -> Tensor:
        """The clamping trick (Diffusion-LM §4.2): each vector replaced by its nearest token embedding."""
        E = self.embeddings(model).detach()
        d = (x.float() ** 2).sum(-1, keepdim=True) - 2 * x.float() @ E.float().T + (E.float() ** 2).sum(-1)
        d[..., self.never] = math.inf
        return E[d.argmin(-1)].to(x.dtype)

    # -- forward process -------------------------------------------------------------------------
    def corrupt(self, batch: Batch, t: Tensor, generator=None, *, model: nn.Module) -> Tensor:
        """z_t ~ q(z_t | e) (B, L, d) for the batch's clean embeddings e (``model``'s table), with given
        (``fixed``) positions left at e."""
        return self._noised(self.embeddings(model)[batch.tokens], batch, t, generator)

    def _noised(self, e: Tensor, batch: Batch, t: Tensor, generator=None) -> Tensor:
        """z_t for given clean embeddings e (B, L, d) (the loss reuses its e: one gather, one gradient path)."""
        B, L, d = e.shape
        eps = gaussian_noise(batch.rand(generator, stream=0, width=L * d)).view(B, L, d).to(e.dtype)
        a = self.schedule.alpha_bar(t).to(e.dtype)[:, None, None]
        z = torch.sqrt(a) * e + torch.sqrt(1 - a) * eps
        return torch.where(batch.fixed[..., None], e, z)

    def predict_x0(self, model: nn.Module, z: Tensor, t: Tensor, x0_prev: Tensor | None = None) -> Tensor:
        """x̂0(z_t, t) (B, L, d); with self-conditioning and no ``x0_prev``, the two-pass prediction."""
        if self.self_conditioning and x0_prev is None:
            with torch.no_grad():
                x0_prev = model(z, t.float())
        return model(z, t.float(), x0_prev=x0_prev) if self.self_conditioning else model(z, t.float())

    # -- bound and loss --------------------------------------------------------------------------
    def _terms(self, model: nn.Module, batch: Batch, generator, training: bool) -> tuple[Tensor, ...]:
        t = batch.time_uniforms(generator)
        if training and self.t0_weight > 0:  # the explicit t = 0 embedding loss as a mixture over t (docstring)
            at0 = batch.rand(generator, stream=4, width=1)[:, 0] < self.t0_weight / (1 + self.t0_weight)
            t = torch.where(at0, torch.zeros_like(t), t)
        e = self.embeddings(model)[batch.tokens]
        z = self._noised(e, batch, t, generator)
        prev = None
        if training and self.self_conditioning:
            use = (batch.rand(generator, stream=3, width=1)[:, 0] < 0.5)[:, None, None]
            with torch.no_grad():
                first = model(z, t.float())
            prev = torch.where(use, first, torch.zeros_like(first))
        x0 = self.predict_x0(model, z, t, prev)
        mse = ((e.double() - x0.double()) ** 2).sum(-1)  # (B, L)
        a1 = self.schedule.alpha_bar(torch.ones((), dtype=torch.float64))
        e2 = (e.double() ** 2).sum(-1)
        d = e.shape[-1]
        prior = 0.5 * (a1 * e2 - d * a1 - d * torch.log1p(-a1))  # KL(N(√ᾱ1 e, 1 − ᾱ1) ‖ N(0, I))
        a0 = self.schedule.alpha_bar(torch.zeros((), dtype=torch.float64))
        B, L = batch.tokens.shape
        eps0 = gaussian_noise(batch.rand(generator, stream=1, width=L * d)).view(B, L, d)
        z0 = torch.sqrt(a0) * e.double() + torch.sqrt(1 - a0) * eps0
        rounding = -F.log_softmax(self.decoder_logits(model, z0), -1).gather(-1, batch.tokens[..., None])[..., 0]
        weight = -0.5 * self.schedule.snr_prime(t)[:, None]  # ½ (−SNR'(t)), the VDM weight
        return mse, weight, prior, rounding, a1 * e2

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        mse, weight, prior, rounding, _ = self._terms(model, batch, generator, training=False)
        terms = weight * mse + prior + rounding
        return torch.where(batch.loss_mask, terms, torch.zeros_like(terms)).float()

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        mse, weight, prior, rounding, mean_term = self._terms(model, batch, None, training=True)
        if self.loss_type == "elbo":
            terms = weight * mse + prior + rounding
        else:
            terms = (1 + self.t0_weight) * mse + mean_term + rounding
        return torch.where(batch.loss_mask, terms, torch.zeros_like(terms)).float()

    # -- reverse steps (pure functions of their inputs) ------------------------------------------
    def posterior(self, x0: Tensor, z: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """q(z_s | z_t, x0) for s < t: mean (like z) and variance (scalar tensor); DDPM eqs. 6–7 with
        α_{t|s} = ᾱ_t/ᾱ_s, β_{t|s} = 1 − α_{t|s}."""
        at, as_ = self.schedule.alpha_bar(t), self.schedule.alpha_bar(s)
        a_ts = at / as_
        b_ts = 1 - a_ts
        mean = (torch.sqrt(as_) * b_ts / (1 - at)) * x0.double() \
            + (torch.sqrt(a_ts) * (1 - as_) / (1 - at)) * z.double()
        return mean, b_ts * (1 - as_) / (1 - at)
