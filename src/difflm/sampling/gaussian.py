"""Samplers for Gaussian embedding diffusion, on the grid t_k = k/steps from t = 1 to t = 0, then the
rounding decoder p(w | z_0) turns z_0 into tokens (sampled in float64).

ddpm        ancestral: z_s ~ q(z_s | z_t, x̂0)  (DDPM eqs. 6–7)
ddim        z_s = √ᾱ_s x̂0 + √(1 − ᾱ_s − σ²) ε̂ + σ ε,  σ² = η² (1 − ᾱ_s)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_s)  (Song et al.
            2021, eq. 12); η = 1 is the DDPM step, η = 0 deterministic
dpm-solver  DPM-Solver++(2M) in x0-prediction form (Lu et al. 2022, Alg. 2; DiffuSeq-v2): with λ = log(α/σ),
            h = λ_s − λ_t, z_s = (σ_s/σ_t) z_t − α_s (e^{−h} − 1) D, D = x̂0 at the first and last step, else
            (1 + 1/(2r)) x̂0 − 1/(2r) x̂0_prev with r = h_prev/h.

Options: ``clamp`` snaps each x̂0 to its nearest token embedding (Diffusion-LM's clamping trick); ``guide``
moves each z_s toward an attribute (``difflm.control.ClassifierGuidance``, Diffusion-LM §5.2);
self-conditioned models get the previous step's x̂0 as their second input. Given positions stay at their
clean embeddings throughout and come out unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion.gaussian import GaussianDiffusion, gaussian_noise
from ..registry import option, register_sampler
from ..rng import uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning


@dataclass
class GaussianOptions:
    clamp: bool | None = option(None, "snap each x̂0 to the nearest token embedding (default: the model's "
                                "process.clamp)")
    guide: Any = option(None, "a difflm.control.ClassifierGuidance that steers each z_s (--classifier)", cli=False)


@dataclass
class DDIMOptions(GaussianOptions):
    eta: float = option(0.0, "η: 0 deterministic, 1 the DDPM step", ge=0)


class GaussianSampler(Sampler):
    families = ("gaussian",)
    Options = GaussianOptions

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.guide = self.options.guide

    def update(self, process: GaussianDiffusion, z: Tensor, x0: Tensor, t: Tensor, s: Tensor, noise: Tensor,
               memory: dict) -> Tensor:
        """z_s from z_t and x̂0 (float64 tensors); ``memory`` carries what multistep methods need."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: GaussianDiffusion, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        rows = self.default_rows(cond, rows, steps)
        clamp = process.clamp if self.options.clamp is None else self.options.clamp
        B, L = cond.shape
        E = process.embeddings(model).detach()
        d = E.shape[-1]
        dev = cond.tokens.device
        fixed = cond.fixed[..., None]
        clean = E[cond.tokens].double()
        z = gaussian_noise(uniform(seed, rows, steps + 1, L * d, stream=2).to(dev)).view(B, L, d)
        z = torch.where(fixed, clean, z)
        nfe = torch.zeros(B, dtype=torch.long, device=dev)
        prev, memory = None, {}
        for k in range(steps, 0, -1):
            t = torch.tensor(k / steps, dtype=torch.float64)
            s = torch.tensor((k - 1) / steps, dtype=torch.float64)
            tt = t.expand(B).to(dev)
            # self-conditioning: the previous step's x̂0 (zeros at the first step) is the second input
            x0_prev = torch.zeros_like(z, dtype=torch.float32) if prev is None else prev.float()
            x0 = process.predict_x0(model, z.float(), tt, x0_prev=x0_prev).double()
            nfe += 1
            prev = x0
            if clamp:
                x0 = process.nearest_embedding(model, x0).double()
            noise = gaussian_noise(uniform(seed, rows, k, L * d, stream=1).to(dev)).view(B, L, d)
            memory["last"] = k == 1
            z_s = self.update(process, z, x0, t, s, noise, memory)
            if self.guide is not None:  # classifier guidance (Diffusion-LM §5.2), anchored at the unguided z_s
                z_s = self.guide(z_s, s, process.posterior(x0, z, t, s)[1], fixed)
            z = torch.where(fixed, clean, z_s)
            if on_step is not None:
                on_step(StepInfo(k, steps, float(t), float(s), cond.tokens, nfe.clone()))
        logits = process.decoder_logits(model, z)
        probs = probs_from_logits(logits, temperature, top_p) if temperature != 1.0 or top_p < 1.0 else \
            torch.softmax(logits, -1)
        u = uniform(seed, rows, 0, L, stream=3).to(dev)
        tokens = sample_categorical(probs.reshape(B * L, -1), u.reshape(-1)).view(B, L)
        return SampleOutput(torch.where(cond.fixed, cond.tokens, tokens), nfe)


@register_sampler
class DDPM(GaussianSampler):
    name = "ddpm"

    def update(self, process, z, x0, t, s, noise, memory):
        mean, var = process.posterior(x0, z, t, s)
        return mean + torch.sqrt(var) * noise


@register_sampler
class DDIM(GaussianSampler):
    name = "ddim"
    Options = DDIMOptions
    bench = ({"eta": 0.0},)

    def update(self, process, z, x0, t, s, noise, memory):
        at, as_ = process.schedule.alpha_bar(t), process.schedule.alpha_bar(s)
        eps = (z - torch.sqrt(at) * x0) / torch.sqrt(1 - at)
        var = float(self.options.eta) ** 2 * (1 - as_) / (1 - at) * (1 - at / as_)
        return torch.sqrt(as_) * x0 + torch.sqrt((1 - as_ - var).clamp_min(0)) * eps + torch.sqrt(var) * noise


@register_sampler
class DPMSolver(GaussianSampler):
    name = "dpm-solver"

    def update(self, process, z, x0, t, s, noise, memory):
        at, as_ = process.schedule.alpha_bar(t), process.schedule.alpha_bar(s)
        lam_t, lam_s = 0.5 * torch.log(at / (1 - at)), 0.5 * torch.log(as_ / (1 - as_))
        h = lam_s - lam_t
        D = x0
        if "x0" in memory and not memory["last"]:
            r = memory["h"] / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * memory["x0"]
        memory.update(x0=x0, h=h)
        return torch.sqrt((1 - as_) / (1 - at)) * z - torch.sqrt(as_) * torch.expm1(-h) * D


__all__ = ["DDIM", "DDPM", "DPMSolver", "GaussianSampler"]
