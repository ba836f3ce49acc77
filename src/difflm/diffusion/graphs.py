"""Per-token continuous-time Markov chains ("graphs", SEDD §3.3, Lou et al. 2024, arXiv 2310.16834).

Both graphs have the forward rate matrix Q_t = σ(t)·(π𝟙ᵀ − I): a token jumps at rate σ(t) to a fresh draw
from π. With α(t) = exp(−∫₀ᵗσ) the marginal is

    p_{t|0}(· | x0) = α(t)·e_{x0} + (1 − α(t))·π,

with π = e_[MASK] (absorbing) or uniform over the N data tokens (uniform; SEDD's Q = 𝟙𝟙ᵀ/N − I).

The denoising score-entropy bound (SEDD eq. 11 with its constant, Thm 3.6) of one position holding x = x_t is

    ∫₀¹ σ(t) Σ_{y≠x} π_x [ s_y − r_y log s_y + K(r_y) ] dt,   r_y = p_{t|0}(y|x0) / p_{t|0}(x|x0),  K(a) = a log a − a,

(the rate into x from y is σ·π_x), s_y ≈ p_t(x with this token set to y) / p_t(x) being the model's
concrete score. ``score_entropy`` returns the Σ for one time, in closed form (no sum over y materialised
beyond one log-sum-exp), in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..registry import BackboneNeeds
from ..schedules import Schedule, build_schedule
from .base import T_MIN, Batch, Process

GRAPHS = ("absorb", "uniform")


def _k(a: Tensor) -> Tensor:
    """K(a) = a log a − a, with K(0) = 0."""
    return torch.where(a > 0, a * torch.log(a.clamp_min(1e-300)) - a, torch.zeros_like(a))


class Graph:
    """An absorbing or uniform per-token CTMC over a vocabulary of size V whose data tokens are the ids
    not in ``never`` (N of them); the absorbing graph's extra state is ``mask_id``."""

    def __init__(self, kind: str, vocab_size: int, never: list[int], mask_id: int | None = None) -> None:
        if kind not in GRAPHS:
            raise ValueError(f"unknown graph {kind!r}; choose one of {', '.join(GRAPHS)}")
        if kind == "absorb" and mask_id is None:
            raise ValueError("the absorbing graph needs a [MASK] id")
        self.kind, self.vocab_size, self.mask_id = kind, vocab_size, mask_id
        support = torch.ones(vocab_size, dtype=torch.bool)
        support[list(never)] = False
        self.support = support  # (V,) True on data tokens
        self.data_ids = torch.nonzero(support).squeeze(-1)  # (N,)
        self.N = int(support.sum())

    @property
    def absorb(self) -> bool:
        return self.kind == "absorb"

    # -- forward process -----------------------------------------------------------------------------
    def corrupt(self, x0: Tensor, alpha: Tensor, r_move: Tensor, r_draw: Tensor,
                fixed: Tensor | None = None) -> Tensor:
        """x_t ~ p_{t|0}(·|x0): each free token jumps to a draw from π with probability 1 − α.
        x0 (B, L); alpha (B,) float64; r_move, r_draw (B, L) uniforms in [0, 1)."""
        move = r_move < (1 - alpha)[:, None]
        if fixed is not None:
            move &= ~fixed
        return torch.where(move, self.draw_limit(r_draw), x0)

    def draw_limit(self, r: Tensor) -> Tensor:
        """Draws from π for uniforms r: [MASK] (absorbing) or a uniform data token."""
        if self.absorb:
            return torch.full(r.shape, self.mask_id, dtype=torch.long, device=r.device)
        idx = (r * self.N).long().clamp_(max=self.N - 1)
        return self.data_ids.to(r.device)[idx]

    def transition_probs(self, x: Tensor, alpha: Tensor) -> Tensor:
        """p_{t|s}(· | x) for a step that keeps a token with probability alpha: (..., V) float64.
        x (...,) ids; alpha broadcastable to x."""
        V = self.vocab_size
        alpha = alpha.double()
        out = (1 - alpha)[..., None] * self.pi(x.device).expand(*x.shape, V)
        return out + alpha[..., None] * torch.nn.functional.one_hot(x, V).double()

    def mix(self, p0: Tensor, alpha: Tensor) -> Tensor:
        """p0·Q̄ = α·p0 + (1 − α)·(Σp0)·π: the marginal at keep-probability α of tokens drawn from p0
        (..., V) float64 (one-hot x0 gives ``transition_probs``); alpha broadcastable to p0[..., 0]."""
        a = alpha.double()[..., None]
        return a * p0 + (1 - a) * p0.sum(-1, keepdim=True) * self.pi(p0.device)

    def kernel_into(self, x: Tensor, keep: Tensor | float) -> Tensor:
        """The column T(x | y) for every y of a step that keeps a token with probability ``keep``:
        keep·𝟙[y = x] + (1 − keep)·π_x. x (...,) ids; keep a float or broadcastable to x.
        Returns (..., V) float64."""
        keep = torch.as_tensor(keep, dtype=torch.float64, device=x.device).expand(x.shape)
        out = ((1 - keep) * self.pi(x.device)[x])[..., None].expand(*x.shape, self.vocab_size).clone()
        return out.scatter_add_(-1, x[..., None], keep[..., None].clone())

    def pi(self, device=None) -> Tensor:
        """The limit distribution π: (V,) float64."""
        if self.absorb:
            p = torch.zeros(self.vocab_size, dtype=torch.float64)
            p[self.mask_id] = 1.0
        else:
            p = self.support.double() / self.N
        return p.to(device)

    # -- the bound -------------------------------------------------------------------------------
    def score_entropy(self, log_s: Tensor, xt: Tensor, x0: Tensor, alpha: Tensor) -> Tensor:
        """Σ_{y≠x} π_x [s_y − r_y log s_y + K(r_y)] per position, float64 (B, L).

        log_s: (B, L, V) model log-scores log s_y (any value at y = x_t; −inf off the support);
        xt, x0: (B, L); alpha: (B,) α(t) float64. For the absorbing graph, positions not masked give 0.
        """
        a = alpha.double()[:, None]
        if self.absorb:
            r = a / (1 - a)  # r_{x0} = α/(1−α) at a masked position, 0 for every other y
            log_s = log_s.masked_fill(~self.support.to(log_s.device), -math.inf)  # y over data tokens
            return self.absorb_score_entropy(log_s.double() - torch.log(r)[..., None], x0, r, xt == self.mask_id)
        N = self.N
        b = (1 - a) / N
        same = xt == x0
        p_x = torch.where(same, a + b, b)
        ls = log_s  # the V-wide passes stay in the input's dtype (float32 from a network), reductions in float64
        keep = self.support.to(ls.device).expand_as(ls).scatter(-1, xt[..., None], False)  # data tokens y ≠ x
        s1 = torch.logsumexp(ls.masked_fill(~keep, -math.inf), dim=-1).double().exp()  # Σ_{y≠x} s_y
        sl = ls.masked_fill(~keep, 0.0).sum(-1, dtype=torch.float64)  # Σ_{y≠x} log s_y
        ls_x0 = ls.gather(-1, x0[..., None]).squeeze(-1).double()
        s2 = (b / p_x) * sl + torch.where(same, torch.zeros_like(sl), (a / p_x) * ls_x0)
        s3 = torch.where(same, (N - 1) * _k(b / (a + b)), _k((a + b) / b) - (N - 2))
        return (s1 - s2 + s3) / N

    @staticmethod
    def absorb_score_entropy(h: Tensor, x0: Tensor, r: Tensor, masked: Tensor) -> Tensor:
        """Absorbing-graph score entropy written with h = log s − log r (the "scale by σ" form), which
        avoids the cancellation between the three terms when r = α/(1−α) is large:
        Σ_y s_y − r log s_{x0} + K(r) = r·(Σ_y e^{h_y} − h_{x0} − 1). h (B, L, V) with −inf off the data;
        r (B, 1) or (B, L); masked (B, L) bool. Returns (B, L) float64, 0 where not masked."""
        h = h.double()
        lse = torch.logsumexp(h, dim=-1).exp()
        h_x0 = h.gather(-1, x0[..., None]).squeeze(-1)
        val = r.expand_as(lse) * (lse - h_x0 - 1)
        return torch.where(masked, val, torch.zeros_like(val))

    def score_entropy_from_x0(self, log_p0: Tensor, xt: Tensor, x0: Tensor, alpha: Tensor) -> Tensor:
        """``score_entropy(exact_log_score_from_x0(log_p0, xt, alpha), xt, x0, alpha)`` for the uniform graph
        in one float64 pass over V instead of a dozen: with x̄ = α p̃ + (1 − α)/N on the data tokens,
        Σ_y x̄_y = 1, so Σ_{y≠x} s_y = (1 − x̄_x)/x̄_x and Σ_{y≠x} log s_y = Σ_y log x̄_y − N log x̄_x; only the
        last sum needs the whole vocabulary. It is taken as Σ_y u_y with u_y = log(x̄_y / b) = log1p(c·p̃_y),
        c = αN/(1 − α), in which log b cancels exactly and every term is 0 off the data: each u_y carries a
        relative rounding error, so the sum's error is ~eps·c and, times the weight σ(t) ∝ 1/α near t = 1, stays
        ~eps instead of growing as 1/α. log_p0 (B, L, V) (−inf off the data); returns (B, L) float64. The
        (B, L, V) pass runs in log_p0's dtype (float32 from a network) and is summed in float64; the gathered
        entries are recomputed in float64."""
        if self.absorb:
            raise ValueError("score_entropy_from_x0 is the uniform graph's; the absorbing graph has its own form")
        a = alpha.double()[:, None]
        N, b = self.N, (1 - a) / self.N
        c = a / b  # x̄_y / b = 1 + c·p̃_y

        def u(lp: Tensor, c: Tensor) -> Tensor:  # log(x̄ / b) = log1p(c·p̃)
            return torch.log1p(c * lp.exp())

        sum_u = u(log_p0, c.to(log_p0.dtype)[..., None]).sum(-1, dtype=torch.float64)
        u_x = u(log_p0.gather(-1, xt[..., None]).squeeze(-1).double(), c)
        u_x0 = u(log_p0.gather(-1, x0[..., None]).squeeze(-1).double(), c)
        l_x = torch.log(b) + u_x  # log x̄_x
        same = xt == x0
        p_x = torch.where(same, a + b, b)
        s1 = torch.expm1(-l_x)  # (1 − x̄_x)/x̄_x
        sl = sum_u - N * u_x  # Σ_y log x̄_y − N log x̄_x, log b cancelled
        ls_x0 = u_x0 - u_x
        s2 = (b / p_x) * sl + torch.where(same, torch.zeros_like(sl), (a / p_x) * ls_x0)
        s3 = torch.where(same, (N - 1) * _k(b / (a + b)), _k((a + b) / b) - (N - 2))
        return (s1 - s2 + s3) / N

    def exact_log_score_from_x0(self, log_p0: Tensor, xt: Tensor, alpha: Tensor) -> Tensor:
        """log s_y = log Σ_a p̃(a) p_{t|0}(y|a) − log Σ_a p̃(a) p_{t|0}(x_t|a): the concrete score that an
        x0-prediction p̃ (D3PM's x0-parameterization, UDLM) implies. log_p0 (B, L, V) log p̃ (−inf off
        the data); returns (B, L, V) float64 (−inf off the support, 0 at y = x_t)."""
        a = alpha.double()[:, None, None]
        lp = log_p0.double()
        if self.absorb:  # p̄ = α p̃ on data tokens, 1 − α on [MASK]
            bar = lp + torch.log(a)
            bar[..., self.mask_id] = torch.log1p(-a[..., 0]).expand_as(bar[..., 0])
        else:  # p̄ = α p̃ + (1 − α)/N on data tokens
            bar = torch.logaddexp(lp + torch.log(a), torch.log((1 - a) / self.N)).expand_as(lp).clone()
            bar = bar.masked_fill(~self.support.to(lp.device), -math.inf)
        return bar - bar.gather(-1, xt[..., None])


class GraphDiffusion(Process):
    """What SEDD and uniform diffusion share: a graph over the data tokens, a schedule α(t), continuous
    times with the score-entropy weight σ(t) = −α'(t)/α(t), and the forward corruption."""

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, **kw) -> None:
        super().__init__(vocab_size, mask_id, pad_id, bos_id, **kw)
        o = self.options
        self.graph = Graph(self.graph_kind(), vocab_size, self.never, mask_id)
        self.schedule = o.schedule if isinstance(o.schedule, Schedule) else build_schedule(o.schedule)
        self.time_conditioning = bool(o.time_conditioning)

    def graph_kind(self) -> str:
        """absorb or uniform: the graph of the forward CTMC."""
        return "uniform"

    def backbone_needs(self) -> BackboneNeeds:
        return BackboneNeeds(time_conditioning=self.time_conditioning)

    def times(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """t ∈ [T_MIN, 1) from uniforms u, and the weight σ(t) = −α'(t)/α(t) (× the Jacobian), (B,) float64."""
        t = T_MIN + (1 - T_MIN) * u.double()
        return t, (1 - T_MIN) * -self.schedule.alpha_prime(t) / self.schedule.alpha(t)

    def draw_prior(self, r: Tensor) -> Tensor:
        """x_1 ~ π for uniforms r (B, L)."""
        return self.graph.draw_limit(r)

    def corrupt(self, batch: Batch, t: Tensor, generator=None) -> Tensor:
        """x_t ~ p_{t|0}(·|x0) for the batch's free positions: (B, L)."""
        r_move, r_draw = batch.rand(generator, stream=0), batch.rand(generator, stream=1)
        return self.graph.corrupt(batch.tokens, self.schedule.alpha(t), r_move, r_draw, batch.fixed)
