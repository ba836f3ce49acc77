"""Samplers for the graph families (uniform diffusion and SEDD), on a uniform time grid t_k = k/steps.

With β = α_t/α_s the one-step forward kernel from s to t is T = β I + (1 − β) π𝟙ᵀ (graphs.py), and

ancestral (uniform, x0-parameterisation; UDLM/D3PM): p(x_s = y | x_t) ∝ T(x_t | y) · [α_s p̃ + (1 − α_s) π]_y.
analytic  (SEDD "Tweedie τ-leaping", Lou et al. §4.2, eq. 19): p(x_s = y | x_t) ∝ (T⁻¹ s)_y · T(x_t | y), with
          T⁻¹ = I/β − ((1 − β)/β) π𝟙ᵀ and s the concrete score (s at x_t is 1); negative entries clipped.
euler     (SEDD τ-leaping, §4.1): p(x_s = y | x_t) = Δσ̄ · π_{x_t} · s_y for y ≠ x_t, with Δσ̄ = log(α_s/α_t).
          Its last step (to t = 0) is the analytic one, SEDD's final denoising step.

At s = 0 the absorbing graph's [MASK] gets probability 0: every position leaves with a token. SEDD samplers
start at t = 1 − 1e-5, where the score is finite; the uniform ancestral sampler starts at t = 1.

Each step runs the network's output head, and computes probabilities, at the positions that can move only: the
free ones, and on the absorbing graph the [MASK] ones among them (a held token never moves again: T(x | y) =
β·𝟙[y = x] when π_x = 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..diffusion.base import Process
from ..errors import DiffLMError
from ..registry import register_sampler
from ..rng import uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning

T_TOP = 1 - 1e-5  # SEDD samplers start here: at t = 1 the concrete score of an absorbing graph is 0/0


class GraphSampler(Sampler):
    families: tuple[str, ...] = ()
    t_max = 1.0

    def step_probs(self, model: nn.Module, process: Process, x: Tensor, t: float, s: float, select: Tensor) -> Tensor:
        """p(x_s | x_t) at the N positions where ``select`` (B, L) is True: (N, V) float64 (rows sum to 1, up
        to the clipping of negative entries)."""
        raise NotImplementedError

    @staticmethod
    def moving(process: Process, x: Tensor, free: Tensor) -> Tensor:
        """(B, L) bool: the free positions that can change in a step (on the absorbing graph: [MASK] only)."""
        return free & (x == process.mask_id) if process.graph.absorb else free

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: Process, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        rows = self.default_rows(cond, rows, steps)
        B, L = cond.shape
        start = process.draw_prior(uniform(seed, rows, steps + 1, L, stream=2).to(cond.tokens.device))
        x = torch.where(cond.fixed, cond.tokens, start)
        nfe = torch.zeros(B, dtype=torch.long, device=x.device)
        free = ~cond.fixed
        for k in range(steps, 0, -1):
            t, s = self.t_max * k / steps, self.t_max * (k - 1) / steps
            nfe += 1  # every row spends the step, whatever else is in the batch
            sel = self.moving(process, x, free)
            if sel.any():
                p = self.step_probs(model, process, x, t, s, sel)
                if s == 0 and process.graph.absorb:
                    p[..., process.mask_id] = 0.0
                p = p.clamp_min(0.0)
                p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
                if temperature != 1.0 or top_p < 1.0:
                    p = probs_from_logits(torch.log(p), temperature, top_p)
                u = uniform(seed, rows, k, L, stream=1)[sel]
                x = x.clone()
                x[sel] = sample_categorical(p, u)
            if on_step is not None:
                on_step(StepInfo(k, steps, t, s, x, nfe.clone()))
        return SampleOutput(x, nfe)


@register_sampler
class UniformAncestral(GraphSampler):
    name = "ancestral"
    families = ("uniform",)

    def step_probs(self, model, process, x, t, s, select):
        sch, g = process.schedule, process.graph
        a_t, a_s = (float(sch.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
        p0 = process.log_probs(model, x, torch.full((x.shape[0],), t, device=x.device), select).double().exp()
        return g.mix(p0, torch.tensor(a_s)) * g.kernel_into(x[select], a_t / a_s)


@register_sampler
class D3PMAncestral(GraphSampler):
    """D3PM ancestral sampling with step skipping (x0-parameterisation): ``steps`` ≤ T reverse steps on the
    integer grid t_j = round(j·T/steps); each step is p_θ(x_s | x_t) ∝ Q_{t|s}[·, x_t] ⊙ (p̃_θ Q̄_s)."""

    name = "ancestral"
    families = ("d3pm",)

    def step_probs(self, model, process, x, t, s, select):
        T = process.T
        if round(t * T) == round(s * T):
            raise DiffLMError(f"a D3PM model with T={T} takes at most {T} sampling steps")
        kt, ks = (torch.tensor(round(v * T), device=x.device) for v in (t, s))
        p0 = process.log_probs(model, x, kt.expand(x.shape[0]), select).exp()
        return process.reverse_probs(p0, x[select], ks, kt)


@register_sampler
class SEDDAnalytic(GraphSampler):
    name = "analytic"
    families = ("sedd",)
    t_max = T_TOP

    def scores(self, model, process, x, t, select) -> Tensor:
        """s_θ(x_t)_y as float64 (N, V) at the positions where ``select`` is True, with s = 1 at the token
        each position holds."""
        tt = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        ls = process.log_score(model, x, tt, select=select)
        return ls.double().scatter(-1, x[select][..., None], 0.0).exp()

    def step_probs(self, model, process, x, t, s, select):
        sch, g = process.schedule, process.graph
        a_t, a_s = (float(sch.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
        beta = a_t / a_s
        sc = self.scores(model, process, x, t, select)
        stag = sc / beta - ((1 - beta) / beta) * g.pi(x.device) * sc.sum(-1, keepdim=True)
        return stag * g.kernel_into(x[select], beta)


@register_sampler
class SEDDEuler(SEDDAnalytic):
    name = "euler"

    def step_probs(self, model, process, x, t, s, select):
        if s == 0:  # the final denoising step is the analytic (Tweedie) one
            return super().step_probs(model, process, x, t, s, select)
        sch, g = process.schedule, process.graph
        a_t, a_s = (float(sch.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
        d_sigma = math.log(a_s / a_t)
        sc = self.scores(model, process, x, t, select)
        held = x[select][..., None]
        rate = d_sigma * g.pi(x.device)[held] * sc
        rate = rate.scatter(-1, held, 0.0).clamp_min(0.0)
        stay = (1 - rate.sum(-1, keepdim=True)).clamp_min(0.0)
        return rate.scatter(-1, held, stay)
