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
β·𝟙[y = x] when π_x = 0). At temperature 1 and no top-p the steps are drawn as the mixtures they are, without
writing p(x_s | x_t) out over V: the ancestral steps (uniform, and D3PM on the uniform or absorbing graph) as stay
at x_t / a token from p̃ / a token from π (``draw_kernel_step``), SEDD's steps on the absorbing graph as stay at
[MASK] / jump to y ∝ s_y (``draw_jump``); only the positions that leave draw their token with a pass over
V. With a temperature or top-p, and for SEDD on the uniform graph, the posterior is written out and filtered.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..diffusion.base import Process
from ..diffusion.d3pm import GraphTransitions
from ..diffusion.graphs import Graph
from ..errors import DiffLMError
from ..registry import register_sampler
from ..rng import uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning

T_TOP = 1 - 1e-5  # SEDD samplers start here: at t = 1 the concrete score of an absorbing graph is 0/0
_BELOW_ONE = 1.0 - 2.0**-53  # a uniform rescaled into a mixture's component stays in [0, 1) whatever the rounding


def alphas(process: Process, t: float, s: float) -> tuple[float, float]:
    """α(t), α(s) of a continuous-time process's schedule, in float64."""
    return tuple(float(process.schedule.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))


def draw_kernel_step(graph: Graph, log_p0: Tensor, x: Tensor, alpha_s: float, keep: float, u: Tensor,
                     exclude: int | None = None) -> Tensor:
    """One draw per row from the x0-parameterised reverse step p(y | x) ∝ T(x | y)·m_y on ``graph``, the posterior
    that ``graph.kernel_into(x, keep) * graph.mix(p̃, alpha_s)`` writes out over V, without writing it out.

    With T(x | y) = keep·𝟙[y = x] + (1 − keep)·π_x and m = α_s·p̃ + (1 − α_s)·π (p̃ normalised) it is a
    mixture of three: stay at x (weight keep·m_x), a token from p̃ (weight (1 − keep)·π_x·α_s) and a token
    from π (weight (1 − keep)·π_x·(1 − α_s)). One uniform per row picks the component and, rescaled into it,
    the token (inverse CDF in float64); only the rows that draw from p̃ make a pass over V.
    ``exclude``: an id given probability 0 (the absorbing graph's [MASK] at s = 0), the rest renormalised.

    log_p0 (N, V) log p̃, normalised (a log-softmax, any float dtype); x (N,) ids; u (N,) float64 in [0, 1)
    -> (N,) ids.
    """
    pi = graph.pi(x.device)
    pi_in, p0_in = pi, 1.0
    if exclude is not None:
        pi_in = pi.clone()
        pi_in[exclude] = 0.0
        p0_in = 1 - log_p0[:, exclude].double().exp()
    pi_x = pi[x]
    m_x = alpha_s * log_p0.gather(-1, x[:, None]).squeeze(-1).double().exp() + (1 - alpha_s) * pi_x
    w_stay = keep * m_x
    if exclude is not None:
        w_stay = torch.where(x == exclude, torch.zeros_like(w_stay), w_stay)
    w_p0 = (1 - keep) * pi_x * alpha_s * p0_in
    w_pi = (1 - keep) * pi_x * (1 - alpha_s) * pi_in.sum()
    v = u.double() * (w_stay + w_p0 + w_pi)
    out = x.clone()
    from_p0 = (v >= w_stay) & (v < w_stay + w_p0)
    if from_p0.any():
        q = log_p0[from_p0].double().exp()
        if exclude is not None:
            q[:, exclude] = 0.0
        out[from_p0] = sample_categorical(q, ((v - w_stay)[from_p0] / w_p0[from_p0]).clamp(0.0, _BELOW_ONE))
    from_pi = (v >= w_stay + w_p0) & (w_pi > 0)
    if from_pi.any():
        r = ((v - w_stay - w_p0)[from_pi] / w_pi[from_pi]).clamp(0.0, _BELOW_ONE)
        cdf = pi_in.cumsum(0)
        out[from_pi] = torch.searchsorted(cdf, r * cdf[-1], right=True)
    return out.clamp_(max=graph.vocab_size - 1)


def draw_jump(log_r: Tensor, x: Tensor, w_stay: Tensor, w_jump: Tensor, u: Tensor) -> Tensor:
    """One draw per row from "stay at x with weight w_stay, else jump to y with probability ∝ r_y" (SEDD's steps
    from [MASK] on the absorbing graph): log_r (N, V) (−inf where no jump goes), x (N,) ids, w_stay, w_jump
    (N,) ≥ 0, u (N,) float64 in [0, 1) -> (N,) ids. Only the rows that jump make a pass over V."""
    v = u.double() * (w_stay + w_jump)
    out = x.clone()
    jump = (v >= w_stay) & (w_jump > 0)
    if jump.any():
        r = ((v - w_stay)[jump] / w_jump[jump]).clamp(0.0, _BELOW_ONE)
        out[jump] = sample_categorical(log_r[jump].double().exp(), r)
    return out


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
        x0-parameterised step on a graph): (log p̃ (N, V), α_s, keep), drawn by ``draw_kernel_step`` without
        writing the posterior out over V; None: the step is drawn from ``step_probs``."""
        return None

    def fast_draw(self, model: nn.Module, process: Process, x: Tensor, t: float, s: float, select: Tensor,
                  u: Tensor, exclude: int | None) -> Tensor | None:
        """The step's tokens at the N positions ``select`` holds, drawn with the uniforms u (N,) from the law
        ``step_probs`` writes out (``exclude`` given probability 0), without writing it out over V: (N,) ids;
        None where this sampler has no such route."""
        ks = self.kernel_step(model, process, x, t, s, select)
        if ks is None:
            return None
        lp, a_s, keep = ks
        return draw_kernel_step(process.graph, lp, x[select], a_s, keep, u, exclude=exclude)

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
                new = self.fast_draw(model, process, x, t, s, sel, u, last_mask) if plain else None
                if new is None:
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
        a_t, a_s = alphas(process, t, s)
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

    @staticmethod
    def log_scores(model, process, x, t, select) -> Tensor:
        """log s_θ(x_t)_y (N, V) in the network's precision at the positions where ``select`` is True."""
        return process.log_score(model, x, torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device),
                                 select=select)

    def scores(self, model, process, x, t, select) -> Tensor:
        """s_θ(x_t)_y as float64 (N, V) at the positions where ``select`` is True, with s = 1 at the token
        each position holds."""
        ls = self.log_scores(model, process, x, t, select)
        return ls.double().scatter(-1, x[select][..., None], 0.0).exp()

    def step_probs(self, model, process, x, t, s, select):
        g = process.graph
        a_t, a_s = alphas(process, t, s)
        beta = a_t / a_s
        sc = self.scores(model, process, x, t, select)
        stag = sc / beta - ((1 - beta) / beta) * g.pi(x.device) * sc.sum(-1, keepdim=True)
        return stag * g.kernel_into(x[select], beta)

    def jump_weights(self, model, process, x, t, s, select) -> tuple[Tensor, Tensor, Tensor]:
        """On the absorbing graph, where every moving position holds [MASK] and the step is "stay, or jump to y
        with probability ∝ s_y": (log s (N, V), −inf at [MASK]; the stay weight (N,); the jump weight (N,)), as
        ``step_probs`` has them before its clipping and normalisation. With R = Σ_{y≠[MASK]} s_y and β = α_t/α_s
        the analytic step (eq. 19) gives p_y = (1 − β)/β · s_y and p_[MASK] = (1 − (1 − β)(1 + R))/β."""
        a_t, a_s = alphas(process, t, s)
        beta = a_t / a_s
        ls = self.log_scores(model, process, x, t, select)
        R = torch.logsumexp(ls, -1).double().exp()  # a V-wide pass in the network's precision, overflow-safe
        return ls, (1 - (1 - beta) * (1 + R)) / beta, (1 - beta) / beta * R

    def fast_draw(self, model, process, x, t, s, select, u, exclude):
        if not process.graph.absorb:
            return None  # the uniform graph's step clips negative entries anywhere in V: written out
        ls, w_stay, w_jump = self.jump_weights(model, process, x, t, s, select)
        w_stay = torch.zeros_like(w_stay) if exclude is not None else w_stay.clamp_min(0.0)
        return draw_jump(ls, x[select], w_stay, w_jump, u)


@register_sampler
class SEDDEuler(SEDDAnalytic):
    name = "euler"

    def step_probs(self, model, process, x, t, s, select):
        if s == 0:  # the final denoising step is the analytic (Tweedie) one
            return super().step_probs(model, process, x, t, s, select)
        g = process.graph
        a_t, a_s = alphas(process, t, s)
        d_sigma = math.log(a_s / a_t)
        sc = self.scores(model, process, x, t, select)
        held = x[select][..., None]
        rate = d_sigma * g.pi(x.device)[held] * sc
        rate = rate.scatter(-1, held, 0.0).clamp_min(0.0)
        stay = (1 - rate.sum(-1, keepdim=True)).clamp_min(0.0)
        return rate.scatter(-1, held, stay)

    def jump_weights(self, model, process, x, t, s, select):
        """τ-leaping from [MASK] (§4.1): p_y = Δσ̄·s_y for y ≠ [MASK] (π_[MASK] = 1), stay 1 − Δσ̄·R; the last step is
        the analytic one."""
        if s == 0:
            return super().jump_weights(model, process, x, t, s, select)
        a_t, a_s = alphas(process, t, s)
        ls = self.log_scores(model, process, x, t, select)
        jump = math.log(a_s / a_t) * torch.logsumexp(ls, -1).double().exp()
        return ls, 1 - jump, jump
