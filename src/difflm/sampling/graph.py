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
β·𝟙[y = x] when π_x = 0). The ancestral steps (uniform, and D3PM on the uniform or absorbing graph) are drawn as
the mixture they are (stay at x_t, a token from p̃, a token from π: ``Graph.draw_step``), so at temperature 1 and
no top-p only the positions that draw from p̃ make a float64 pass over the vocabulary; with a temperature or
top-p the posterior is written out over V and filtered.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..diffusion.base import Process
from ..diffusion.d3pm import GraphTransitions
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

    def kernel_step(self, model: nn.Module, process: Process, x: Tensor, t: float, s: float,
                    select: Tensor) -> tuple[Tensor, float, float] | None:
        """Where p(x_s | x_t) ∝ T(x_t | y)·[α_s·p̃ + (1 − α_s)·π]_y with T = keep·I + (1 − keep)·π𝟙ᵀ (the
        x0-parameterised step on a graph): (log p̃ (N, V), α_s, keep), drawn by ``Graph.draw_step`` without
        writing the posterior out over V; None: the step is drawn from ``step_probs``."""
        return None

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
                u = uniform(seed, rows, k, L, stream=1)[sel]
                last_mask = process.mask_id if s == 0 and process.graph.absorb else None
                plain = temperature == 1.0 and top_p >= 1.0
                ks = self.kernel_step(model, process, x, t, s, sel) if plain else None
                if ks is not None:
                    lp, a_s, keep = ks
                    new = process.graph.draw_step(lp, x[sel], a_s, keep, u, exclude=last_mask)
                else:
                    p = self.step_probs(model, process, x, t, s, sel)
                    if last_mask is not None:
                        p[..., last_mask] = 0.0
                    p = p.clamp_min(0.0)
                    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
                    if not plain:
                        p = probs_from_logits(torch.log(p), temperature, top_p)
                    new = sample_categorical(p, u)
                x = x.clone()
                x[sel] = new
            if on_step is not None:
                on_step(StepInfo(k, steps, t, s, x, nfe.clone()))
        return SampleOutput(x, nfe)


@register_sampler
class UniformAncestral(GraphSampler):
    name = "ancestral"
    families = ("uniform",)

    def step_probs(self, model, process, x, t, s, select):
        lp, a_s, keep = self.kernel_step(model, process, x, t, s, select)
        g = process.graph
        return g.mix(lp.double().exp(), torch.tensor(a_s)) * g.kernel_into(x[select], keep)

    def kernel_step(self, model, process, x, t, s, select):
        a_t, a_s = (float(process.schedule.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
        lp = process.log_probs(model, x, torch.full((x.shape[0],), t, device=x.device), select)
        return lp, a_s, a_t / a_s


@register_sampler
class D3PMAncestral(GraphSampler):
    """D3PM ancestral sampling with step skipping (x0-parameterisation): ``steps`` ≤ T reverse steps on the
    integer grid t_j = round(j·T/steps); each step is p_θ(x_s | x_t) ∝ Q_{t|s}[·, x_t] ⊙ (p̃_θ Q̄_s)."""

    name = "ancestral"
    families = ("d3pm",)

    def step_probs(self, model, process, x, t, s, select):
        kt, ks = self._steps(process, t, s, x.device)
        p0 = process.log_probs(model, x, kt.expand(x.shape[0]), select).exp()
        return process.reverse_probs(p0, x[select], ks, kt)

    def kernel_step(self, model, process, x, t, s, select):
        if not isinstance(process.transitions, GraphTransitions):
            return None  # the gaussian matrices: written out over the data tokens
        kt, ks = self._steps(process, t, s, x.device)
        a_t, a_s = (float(process.transitions.alpha_bar[k]) for k in (kt, ks))
        lp = process.log_probs(model, x, kt.expand(x.shape[0]), select, dtype=torch.float32)
        return lp, a_s, a_t / a_s if a_s > 0 else 0.0  # Q_{t|s} keeps a token with probability ᾱ_t/ᾱ_s

    @staticmethod
    def _steps(process, t: float, s: float, device) -> tuple[Tensor, Tensor]:
        T = process.T
        if round(t * T) == round(s * T):
            raise DiffLMError(f"a D3PM model with T={T} takes at most {T} sampling steps")
        return tuple(torch.tensor(round(v * T), device=device) for v in (t, s))


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
