"""Samplers for masked diffusion (MDLM §3.4 / Algorithm 2).

ancestral: at each of `steps` uniform steps t -> s, every masked position is unmasked with probability
           (α_s − α_t)/(1 − α_t) and, if so, takes a token drawn from the network's x̂0; given tokens are kept.
cached:    the same chain, but a sequence's x̂0 is reused while none of its tokens changed (MDLM's
           ``ddpm_cache``): exact for a time-free network, and at most one network call per change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..diffusion.masked import MaskedDiffusion
from ..errors import DiffLMError
from ..registry import option, register_sampler
from ..rng import seed_rows, uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo, Trajectory, on_rows
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning


@register_sampler
class MaskedAncestral(Sampler):
    name = "ancestral"
    families = ("masked",)
    stepwise = True
    cache = False

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: MaskedDiffusion, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        return self.run_stepwise(model, process, cond, steps=steps, seed=seed, rows=rows, temperature=temperature,
                                 top_p=top_p, on_step=on_step)

    def start(self, process: MaskedDiffusion, cond: Conditioning) -> Tensor:
        if self.cache and process.time_conditioning:
            raise DiffLMError(
                "the cached sampler needs a time-free network (process.time_conditioning: false); "
                "use --sampler ancestral for this model"
            )
        return cond.initial(process.mask_id)

    def initial_state(self, process: MaskedDiffusion, cond: Conditioning) -> dict[str, Tensor]:
        if not self.cache:
            return {}
        B, L = cond.shape
        # the SUBS log-probs of each row's last network call, and whether the row changed since (or never had one)
        return {"logp": torch.zeros(B, L, process.vocab_size, device=cond.tokens.device),
                "dirty": torch.ones(B, dtype=torch.bool, device=cond.tokens.device)}

    @torch.no_grad()
    def advance(self, model: nn.Module, process: MaskedDiffusion, traj: Trajectory, *, steps: int,
                temperature: float = 1.0, top_p: float = 1.0) -> Trajectory:
        x, k, nfe = traj.x, traj.k, traj.nfe.clone()
        B, L = x.shape
        m = process.mask_id
        live = k > 0
        t64, s64 = k.double() / steps, (k - 1).clamp(min=0).double() / steps  # each row on its own clock
        t_vec = t64.float()
        masked = (x == m) & live[:, None]
        p_unmask = process.unmask_probability(t_vec, s64.float())  # (B,) float64, MDLM eq. 7
        u_move = uniform(traj.seed, traj.rows, k, L, stream=0)
        unmask = masked & (u_move < p_unmask[:, None])  # drawn before the call: x̂0 is needed only there
        state = traj.state
        if not self.cache:
            idx = live.nonzero().squeeze(-1)
            chosen = process.log_probs(on_rows(model, idx), x[idx], t_vec[idx], select=unmask[idx])  # (N, V)
            nfe[idx] += 1
        else:
            logp, dirty = state["logp"], state["dirty"]
            need = (dirty & masked.any(-1)).nonzero().squeeze(-1)
            if len(need):
                logp = logp.clone()
                logp[need] = process.log_probs(on_rows(model, need), x[need], t_vec[need]).to(logp.dtype)
                nfe[need] += 1
            chosen = logp[unmask]
        if unmask.any():
            probs = probs_from_logits(chosen, temperature, top_p)
            u_tok = uniform(traj.seed, traj.rows, k, L, stream=1)[unmask]
            x = x.clone()
            x[unmask] = sample_categorical(probs, u_tok)
        if self.cache:
            state = {"logp": logp, "dirty": unmask.any(-1)}
        return traj.replace(x=x, k=(k - 1).clamp(min=0), nfe=nfe, state=state)


@register_sampler
class MaskedCached(MaskedAncestral):
    name = "cached"
    cache = True


@register_sampler
class FirstHitting(Sampler):
    """First-hitting sampler (Zheng et al. 2024, arXiv 2409.02908, Alg. 1): with n tokens still masked at
    time t, the next time any of them unmasks is s with P(all still masked at s) = ((1 − α_s)/(1 − α_t))^n,
    so 1 − α_s = (1 − α_t)·u^{1/n}; at s one masked position, uniformly chosen, takes a token from x̂0. No
    time grid, no discretisation error, exactly one network call per generated token (``steps`` is
    ignored). Every row keeps its own clock, so rows run batched and a row's draws depend only on
    (seed, row, token index): the same text at any batch size."""

    name = "first-hitting"
    families = ("masked",)
    step_free = True

    @staticmethod
    def next_time(process: MaskedDiffusion, t: Tensor, n: Tensor, u: Tensor) -> Tensor:
        """s solving 1 − α(s) = (1 − α(t))·u^{1/n}, by bisection on the monotone α (float64, (B,))."""
        target = (1 - process.schedule.alpha(t)) * u ** (1.0 / n.double())
        lo, hi = torch.zeros_like(t), t.clone()
        for _ in range(60):
            mid = (lo + hi) / 2
            below = (1 - process.schedule.alpha(mid)) < target  # 1 − α increases with time
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return hi

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: MaskedDiffusion, cond: Conditioning, *, steps: int = 0, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        rows = self.default_rows(cond, rows)  # steps unused: one call per token
        B, L = cond.shape
        m = process.mask_id
        x = cond.initial(m)
        nfe = torch.zeros(B, dtype=torch.long, device=x.device)
        t = torch.ones(B, dtype=torch.float64, device=x.device)
        total = int((x == m).sum(-1).max()) if B else 0
        for j in range(total):
            masked = x == m
            n = masked.sum(-1)
            idx = (n > 0).nonzero().squeeze(-1)
            if len(idx) == 0:
                break
            sd = seed_rows(seed, idx)
            u = uniform(sd, rows[idx], j, 2, stream=4)
            s = self.next_time(process, t[idx], n[idx], u[:, 0])
            # the position: the ⌊u·n⌋-th masked one of the row
            k = torch.floor(u[:, 1] * n[idx]).long().clamp(max=n[idx] - 1)
            order = masked[idx].long().cumsum(-1) - 1
            at = (order == k[:, None]) & masked[idx]  # (len(idx), L), one True per row
            pos = at.float().argmax(-1)
            # x̂0 at that position only, from the state just before the jump at s
            logp = process.log_probs(on_rows(model, idx), x[idx], s.float(), select=at)
            nfe[idx] += 1
            probs = probs_from_logits(logp, temperature, top_p)
            u_tok = uniform(sd, rows[idx], j, 1, stream=5)[:, 0]
            x = x.clone()
            x[idx, pos] = sample_categorical(probs, u_tok)
            t[idx] = s
            if on_step is not None:
                on_step(StepInfo(total - j, total, float(t.max()), float(s.max()), x, nfe.clone()))
        return SampleOutput(x, nfe)


@dataclass
class ReMDMOptions:
    eta: float = option(0.02, "remasking η in [0, 1] (0: the ancestral sampler)", ge=0, le=1)
    strategy: Literal["cap", "rescale"] = option("cap", "cap: σ_t = min(η, σ_max) | rescale: σ_t = η·σ_max")

    def __post_init__(self) -> None:
        if self.strategy not in ("cap", "rescale"):
            raise DiffLMError(f"ReMDM strategy must be cap or rescale, got {self.strategy!r}")
        if not 0 <= self.eta <= 1:
            raise DiffLMError(f"ReMDM --eta must be in [0, 1], got {self.eta}")


@register_sampler
class ReMDM(Sampler):
    """ReMDM remasking sampler (Wang et al. 2025, arXiv 2503.00307, eq. 7): a reverse step that may re-mask
    decoded tokens, with the same marginals q(z_s | x) as MDLM's for any σ_t ∈ [0, σ_max],
    σ_max = min(1, (1 − α_s)/α_t):
        z_t ≠ m:  z_s = z_t w.p. 1 − σ_t, else [MASK]
        z_t = m:  z_s ~ x̂0 w.p. (α_s − (1 − σ_t)α_t)/(1 − α_t), else [MASK]
    ``strategy`` "cap": σ_t = min(η, σ_max) (ReMDM-cap); "rescale": σ_t = η·σ_max (ReMDM-rescale). η = 0 is
    the ancestral sampler draw for draw (same random streams). The marginal identity holds for the joint
    posterior; with a factorized x̂0 simultaneous changes add an error that vanishes as σ_max ∝ step size → 0."""

    name = "remdm"
    families = ("masked",)
    Options = ReMDMOptions
    bench = ({"eta": 0.02},)

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: MaskedDiffusion, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        rows = self.default_rows(cond, rows, steps)
        B, L = cond.shape
        m = process.mask_id
        free = ~cond.fixed
        x = cond.initial(m)
        nfe = torch.zeros(B, dtype=torch.long, device=x.device)
        for k in range(steps, 0, -1):
            t, s = k / steps, (k - 1) / steps
            a_t = float(process.schedule.alpha(torch.tensor(t, dtype=torch.float64)))
            a_s = float(process.schedule.alpha(torch.tensor(s, dtype=torch.float64)))
            s_max = min(1.0, (1 - a_s) / a_t) if a_t > 0 else 1.0
            eta = float(self.options.eta)
            sigma = min(eta, s_max) if self.options.strategy == "cap" else eta * s_max
            masked = x == m
            p_unmask = min(max((a_s - (1 - sigma) * a_t) / (1 - a_t), 0.0), 1.0)
            unmask = masked & (uniform(seed, rows, k, L, stream=0) < p_unmask)
            remask = ~masked & free & (uniform(seed, rows, k, L, stream=7) < sigma)
            chosen = process.log_probs(model, x, torch.full((B,), t, device=x.device), select=unmask)  # (N, V)
            nfe += 1
            x = x.clone()
            if unmask.any():
                probs = probs_from_logits(chosen, temperature, top_p)
                x[unmask] = sample_categorical(probs, uniform(seed, rows, k, L, stream=1)[unmask])
            x[remask] = m
            if on_step is not None:
                on_step(StepInfo(k, steps, t, s, x, nfe.clone()))
        return SampleOutput(x, nfe)
