"""D3PM: discrete-time diffusion with transition matrices (Austin et al. 2021, arXiv 2107.03006).

Forward (eq. 2):  q(x_t | x_{t−1}) = Cat(x_{t−1} Q_t),  q(x_t | x0) = Cat(x0 Q̄_t),  Q̄_t = Q_1 ⋯ Q_t.
Matrices (§3, App. A.2), over the N data tokens (plus [MASK] for absorb):
  uniform   Q_t = (1 − β_t) I + β_t 𝟙𝟙ᵀ/N                              stationary: uniform
  absorb    Q_t = (1 − β_t) I + β_t 𝟙e_mᵀ                               stationary: [MASK]
  gaussian  [Q_t]_ij ∝ exp(−4(i − j)²/((N−1)²β_t)) for i ≠ j, diagonal 1 − Σ_{j≠i}  (discretized Gaussian
            over token ids, App. A.2.2; symmetric, so doubly stochastic with a uniform stationary law)
Posterior (eq. 3):       q(x_{t−1} | x_t, x0) ∝ Q_t[·, x_t] ⊙ (x0 Q̄_{t−1}).
x0-parameterisation (eq. 4): p_θ(x_{t−1} | x_t) ∝ Q_t[·, x_t] ⊙ (p̃_θ(·|x_t) Q̄_{t−1}).
Bound (eq. 1): L_vlb = KL(q(x_T|x0) ‖ p(x_T)) + Σ_{t=1..T} E_q KL(q(x_{t−1}|x_t,x0) ‖ p_θ(x_{t−1}|x_t)); with
Q̄_0 = I the t = 1 term is the same formula (q is the point mass on x0, so the KL is −log p_θ(x0 | x_1)).
Training: the hybrid loss L_vlb + λ·E[−log p̃_θ(x0|x_t)] (eq. 5) at a uniformly drawn t; the one-sample
estimate of L_vlb is T × the t-th term, and the cross-entropy is scaled by T too, so that λ weighs it
against one step's KL as in the paper's implementation.
Caveat (uniform, gaussian): the p̃ that makes eq. 4 the true reverse step is p(x0ⁱ | x_t without position i),
since Q_t[·, x_t] already carries x_tⁱ's evidence, while the cross-entropy's optimum is p(x0ⁱ | x_t); the two
terms pull apart, and with T = 1000 the CE dominates at λ = 0.01 (on the Markov test source the bound stays at
the unigram entropy; λ = 0.001 reaches H + 0.14). For absorb they coincide (Q̄_t[x0, [MASK]] is constant).
Sampling with step skipping: p_θ(x_s | x_t) ∝ Q_{t|s}[·, x_t] ⊙ (p̃_θ Q̄_s),  Q_{t|s} = Q_{s+1} ⋯ Q_t.
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
from ..schedules import BETA_SCHEDULES, beta_schedule, betas_from_alpha, build_schedule
from .base import Batch, Process
from .graphs import Graph

TRANSITIONS = ("uniform", "absorb", "gaussian")
DEFAULT_BETAS = {"uniform": "cosine", "absorb": "jsd", "gaussian": "linear"}  # the paper's choices
_NEG = -1e30  # a finite stand-in for log 0
DENSE_LIMIT = 2**27  # float64 entries the gaussian matrices may hold (1 GiB)


class GraphTransitions:
    """Uniform and absorbing matrices Q_t = (1 − β_t) I + β_t 𝟙πᵀ: every product of them has the same form
    with keep probability ᾱ_t/ᾱ_s (ᾱ_t = Π(1 − β)), so nothing N × N is materialised."""

    def __init__(self, graph: Graph, betas: Tensor) -> None:
        self.graph = graph
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])  # (T+1,)

    def mix(self, p0: Tensor, k: Tensor) -> Tensor:
        """p0 Q̄_k: (..., V) float64 for p0 (..., V) and step indices k (...)."""
        return self.graph.mix(p0, self.alpha_bar.to(p0.device)[k])

    def into(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """The columns Q_{t|s}[·, x]: (..., V) float64, for x, s < t (...)."""
        ab = self.alpha_bar.to(x.device)
        a_s, a_t = ab[s], ab[t]
        keep = torch.where(a_s > 0, a_t / a_s.clamp_min(1e-300), torch.zeros_like(a_t))
        return self.graph.kernel_into(x, keep)

    def step_kl(self, log_p0: Tensor, x0: Tensor, xt: Tensor, k: Tensor) -> Tensor:
        """KL(q(x_{k−1} | x_k, x0) ‖ p_θ(x_{k−1} | x_k)) in closed form: (M,) float64 for log_p0 (M, V), x0, xt,
        k (M,). Both distributions are col ⊙ m / Z with the same column col(y) = r·1[y = x_k] + c (c = (1−r)π(x_k),
        r = ᾱ_k/ᾱ_{k−1}) and m_q = a·e_{x0} + (1−a)π, m_p = a·p̃ + (1−a)π (a = ᾱ_{k−1}); col cancels, so
        KL = [c·Σ_y m_q log(m_q/m_p) + r·m_q(x_k) log(m_q(x_k)/m_p(x_k))]/Z_q + log Z_p − log Z_q,
        Z = c + r·m(x_k), and Σ_y m_q log m_p = a·log m_p(x0) + (1−a)·E_π[log m_p]: one pass over V
        instead of materialising both posteriors (the ``reverse_probs`` route, which tests compare)."""
        a, r, pi = self._coefficients(k, x0.device)
        # log m_p with −inf floored to a finite −1e30 (exp underflows to exactly 0, so the values are
        # unchanged): logaddexp(−inf, −inf) has a NaN gradient, which log_softmax would spread to every logit
        log_mp = torch.logaddexp(torch.log(a)[:, None] + log_p0.double().clamp_min(_NEG),
                                 torch.log1p(-a).clamp_min(_NEG)[:, None] + torch.log(pi).clamp_min(_NEG))
        e_pi = torch.where(pi > 0, pi * log_mp, torch.zeros_like(log_mp)).sum(-1)  # E_π[log m_p]
        mp_x0, mp_xt = log_mp.gather(-1, x0[:, None]).squeeze(-1), log_mp.gather(-1, xt[:, None]).squeeze(-1)
        return self._kl(a, r, pi, x0, xt, e_pi, mp_x0, mp_xt)

    def step_kl_from_logits(self, logits: Tensor, x0: Tensor, xt: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``step_kl`` and log p̃_θ(x0 | x_k) from the network's logits (M, V) (−inf off the data), both (M,)
        float64. The vocabulary-wide passes (normaliser, E_π[log m_p]) run in the logits' float32 with float64
        sums; the entries at x0 and x_k are gathered and finished in float64 (training at a 10k vocabulary
        spends most of its time in these passes; ``step_kl`` on float64 log-probabilities is the reference)."""
        a, r, pi = self._coefficients(k, x0.device)
        logits = logits.float()
        top = logits.max(-1, keepdim=True).values.detach()
        lse = top.squeeze(-1).double() + torch.exp(logits - top).sum(-1, dtype=torch.float64).log()
        lp_x0 = logits.gather(-1, x0[:, None]).squeeze(-1).double() - lse
        lp_xt = logits.gather(-1, xt[:, None]).squeeze(-1).double() - lse
        log_pi = torch.log(pi).clamp_min(_NEG)
        log_a, log_1a = torch.log(a), torch.log1p(-a).clamp_min(_NEG)
        mp_x0 = torch.logaddexp(log_a + lp_x0.clamp_min(_NEG), log_1a + log_pi[x0])
        mp_xt = torch.logaddexp(log_a + lp_xt.clamp_min(_NEG), log_1a + log_pi[xt])
        # E_π[log m_p] = Σ_y π_y log(a p̃_y + (1−a) π_y); floored so that a = 1 rows (weight 1 − a = 0) stay finite
        p0 = torch.exp(logits - lse.float()[:, None])
        m = (a.float()[:, None] * p0 + (1 - a).float()[:, None] * pi.float()).clamp_min(1e-37)
        e_pi = (pi.float() * torch.log(m)).sum(-1, dtype=torch.float64)
        return self._kl(a, r, pi, x0, xt, e_pi, mp_x0, mp_xt), lp_x0

    def _coefficients(self, k: Tensor, device) -> tuple[Tensor, Tensor, Tensor]:
        """a = ᾱ_{k−1}, r = ᾱ_k/ᾱ_{k−1} (M,) and π (V,), float64."""
        ab = self.alpha_bar.to(device)
        a, at = ab[k - 1], ab[k]
        r = torch.where(a > 0, at / a.clamp_min(1e-300), torch.zeros_like(at))
        return a, r, self.graph.pi(device)

    def _kl(self, a: Tensor, r: Tensor, pi: Tensor, x0: Tensor, xt: Tensor, e_pi: Tensor, mp_x0: Tensor,
            mp_xt: Tensor) -> Tensor:
        """The closed form of ``step_kl`` from E_π[log m_p] and log m_p at x0 and x_k (M,) float64."""
        c = (1 - r) * pi[xt]
        b = (1 - a) * pi[x0]  # (1−a)π at x0: the uniform background there (0 for absorb)
        if self.graph.absorb:
            mq_log_mq = _xlogx(a) + _xlogx(1 - a)
        else:
            mq_log_mq = _xlogx(a + b) + (self.graph.N - 1) * _xlogx(b)
        mq_log_mp = _xmul(a, mp_x0) + _xmul(1 - a, e_pi)
        mq_xt = a * (xt == x0) + (1 - a) * pi[xt]
        z_q, z_p = c + r * mq_xt, c + r * mp_xt.exp()
        at_xt = torch.where(mq_xt > 0, _xmul(r * mq_xt, torch.log(mq_xt.clamp_min(1e-300)) - mp_xt),
                            torch.zeros_like(mq_xt))
        kl = (_xmul(c, mq_log_mq - mq_log_mp) + at_xt) / z_q + torch.log(z_p) - torch.log(z_q)
        return kl.clamp_min(0.0)

    def corrupt(self, x0: Tensor, k: Tensor, r_move: Tensor, r_draw: Tensor, fixed: Tensor | None) -> Tensor:
        """x_k ~ Cat(x0 Q̄_k): x0 (B, L), k (B,), uniforms (B, L)."""
        return self.graph.corrupt(x0, self.alpha_bar.to(x0.device)[k], r_move, r_draw, fixed)

    def draw_prior(self, r: Tensor) -> Tensor:
        return self.graph.draw_limit(r)

    def prior_kl(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x0) ‖ π) per position: (...) float64."""
        a = float(self.alpha_bar[-1])
        if self.graph.absorb:  # ᾱ_T = 0 is enforced, so q(x_T | x0) = π
            return torch.zeros(x0.shape, dtype=torch.float64, device=x0.device)
        N = self.graph.N
        b = (1 - a) / N
        kl = (a + b) * math.log((a + b) * N) + ((N - 1) * b * math.log(b * N) if b > 0 else 0.0)
        return torch.full(x0.shape, kl, dtype=torch.float64, device=x0.device)


def _xlogx(x: Tensor) -> Tensor:
    return torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))


def _xmul(x: Tensor, y: Tensor) -> Tensor:
    """x·y with 0·(±inf) = 0."""
    return torch.where(x == 0, torch.zeros_like(x), x * y)


class DenseTransitions:
    """Any Q_1..Q_T given as (T, N, N) row-stochastic matrices over the N data tokens (ids ``data_ids``
    of a V-token vocabulary), with the cumulative products Q̄_t precomputed; uniform stationary law."""

    def __init__(self, Q: Tensor, data_ids: Tensor, vocab_size: int) -> None:
        T, N, _ = Q.shape
        eye = torch.eye(N, dtype=torch.float64)
        self.Q = torch.cat([eye[None], Q.double()])  # (T+1, N, N); Q[0] = I
        bar = [eye]
        for t in range(1, T + 1):
            bar.append(bar[-1] @ self.Q[t])
        self.Qbar = torch.stack(bar)  # (T+1, N, N)
        self.data_ids, self.V, self.N = data_ids, vocab_size, N
        index = torch.full((vocab_size,), -1, dtype=torch.long)
        index[data_ids] = torch.arange(N)
        self.index = index  # vocabulary id -> data index (−1 off the data)
        last = self.Qbar[-1]
        self._prior_kl = torch.where(last > 0, last * torch.log(last * N), torch.zeros_like(last)).sum(-1)  # (N,)

    def _embed(self, p: Tensor) -> Tensor:
        out = torch.zeros(*p.shape[:-1], self.V, dtype=torch.float64, device=p.device)
        out[..., self.data_ids.to(p.device)] = p
        return out

    def mix(self, p0: Tensor, k: Tensor) -> Tensor:
        p = p0[..., self.data_ids.to(p0.device)].double()
        out = torch.empty_like(p)
        k = k.expand(p.shape[:-1])
        for kk in torch.unique(k).tolist():
            sel = k == kk
            out[sel] = p[sel] @ self.Qbar[kk].to(p.device)
        return self._embed(out)

    def into(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        xi = self.index.to(x.device)[x]
        out = torch.zeros(*x.shape, self.N, dtype=torch.float64, device=x.device)
        s, t = s.expand(x.shape), t.expand(x.shape)
        pairs = torch.stack([s, t], -1).reshape(-1, 2)
        for ss, tt in torch.unique(pairs, dim=0).tolist():
            M = self.Q[tt]
            for j in range(tt - 1, ss, -1):
                M = self.Q[j] @ M
            sel = (s == ss) & (t == tt)
            out[sel] = M.to(x.device)[:, xi[sel]].T
        return self._embed(out)

    def corrupt(self, x0: Tensor, k: Tensor, r_move: Tensor, r_draw: Tensor, fixed: Tensor | None) -> Tensor:
        rows = self.Qbar.to(x0.device)[k[:, None].expand_as(x0), self.index.to(x0.device)[x0]]  # (B, L, N)
        idx = torch.searchsorted(rows.cumsum(-1), (r_draw * rows.sum(-1))[..., None], right=True).squeeze(-1)
        xt = self.data_ids.to(x0.device)[idx.clamp_(max=self.N - 1)]
        return xt if fixed is None else torch.where(fixed, x0, xt)

    def draw_prior(self, r: Tensor) -> Tensor:
        return self.data_ids.to(r.device)[(r * self.N).long().clamp_(max=self.N - 1)]

    def prior_kl(self, x0: Tensor) -> Tensor:
        return self._prior_kl.to(x0.device)[self.index.to(x0.device)[x0].clamp_min(0)]


def discretized_gaussian(N: int, beta: float) -> Tensor:
    """D3PM App. A.2.2: [Q]_ij = exp(−4(i−j)²/((N−1)²β)) / Σ_{n=−(N−1)}^{N−1} exp(−4n²/((N−1)²β)) for i ≠ j,
    and 1 − (row sum) on the diagonal. (N, N) float64."""
    i = torch.arange(N, dtype=torch.float64)
    scale = 4.0 / ((N - 1) ** 2 * beta)
    n = torch.arange(-(N - 1), N, dtype=torch.float64)
    Q = torch.exp(-scale * (i[:, None] - i[None, :]) ** 2) / torch.exp(-scale * n**2).sum()
    Q.fill_diagonal_(0.0)
    return Q + torch.diag(1 - Q.sum(1))


@dataclass
class D3PMOptions:
    transition: Literal["uniform", "absorb", "gaussian"] = option("absorb", "Q_t: uniform, absorb or gaussian (§3)")
    steps: int = option(1000, "T, the number of discrete steps", ge=1)
    schedule: str | None = option(None, "β schedule: linear, cosine or jsd (default: the paper's for the transition)")
    beta_min: float = option(1e-4, "linear β schedule: β_1 (gaussian transition: a kernel width)", ge=0)
    beta_max: float = option(0.02, "linear β schedule: β_T (gaussian transition: a kernel width)", ge=0)
    alpha_schedule: str | dict | None = option(None, "a continuous α(t) read at t = k/T instead of a β schedule")
    hybrid_lambda: float = option(0.01, "λ of the hybrid loss L_vlb + λ·CE (eq. 5)", ge=0)
    time_conditioning: bool = option(True, "feed t = k/T to the network (adaLN)")


@register_family
class D3PM(Process):
    family = "d3pm"
    Options = D3PMOptions
    default_sampler = "ancestral"
    discrete_time = True

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, **kw) -> None:
        super().__init__(vocab_size, mask_id, pad_id, bos_id, **kw)
        o = self.options
        transition, schedule, alpha_schedule = o.transition, o.schedule, o.alpha_schedule
        beta_min, beta_max, hybrid_lambda = o.beta_min, o.beta_max, o.hybrid_lambda
        if transition not in TRANSITIONS:
            raise DiffLMError(f"unknown D3PM transition {transition!r}; choose one of {', '.join(TRANSITIONS)}")
        if schedule is not None and alpha_schedule is not None:
            raise DiffLMError("give a D3PM either schedule (β: linear, cosine, jsd) or alpha_schedule, not both")
        if transition == "gaussian" and alpha_schedule is not None:
            raise DiffLMError("the gaussian transition's β is a kernel width, not a jump probability, so an α "
                              "schedule does not define it: give schedule (linear) with beta_min/beta_max")
        if schedule is not None and schedule not in BETA_SCHEDULES:
            raise DiffLMError(f"D3PM schedule {schedule!r} is not a β schedule ({', '.join(BETA_SCHEDULES)}); a "
                              "continuous α schedule goes in process.alpha_schedule")
        self.transition, self.T = transition, int(o.steps)
        self.schedule_name = None if alpha_schedule is not None else (schedule or DEFAULT_BETAS[transition])
        self.beta_min, self.beta_max, self.hybrid_lambda = beta_min, beta_max, hybrid_lambda
        self.alpha_schedule = None if alpha_schedule is None else build_schedule(alpha_schedule)
        self.time_conditioning = bool(o.time_conditioning)
        if self.alpha_schedule is not None:
            betas = betas_from_alpha(self.alpha_schedule, self.T)
        else:
            betas = beta_schedule(self.schedule_name, self.T, beta_min, beta_max)
        if transition == "absorb":
            betas[-1] = 1.0  # everything is masked at T, so p(x_T) = δ_[MASK] and the prior term is exactly 0
        self.betas = betas
        graph = Graph("uniform" if transition == "gaussian" else transition, vocab_size, self.never, mask_id)
        self.graph = graph
        if transition == "gaussian":
            N = graph.N
            if N < 2 or 2 * (self.T + 1) * N * N > DENSE_LIMIT:
                raise DiffLMError(
                    f"the gaussian transition stores 2×(T+1)×N×N matrices; T={self.T} and N={N} data tokens is "
                    "too many: use a character tokenizer, fewer steps, or transition uniform/absorb"
                )
            Q = torch.stack([discretized_gaussian(N, float(b)) for b in betas])
            self.transitions = DenseTransitions(Q, graph.data_ids, vocab_size)
        else:
            self.transitions = GraphTransitions(graph, betas)

    def backbone_needs(self) -> BackboneNeeds:
        return BackboneNeeds(time_conditioning=self.time_conditioning)

    # -- forward process -------------------------------------------------------------------------
    def steps_from_uniforms(self, u: Tensor) -> Tensor:
        """t ∈ {1..T} from uniforms u ∈ [0, 1): (B,) long."""
        return torch.clamp(torch.floor(u.double() * self.T).long() + 1, 1, self.T)

    def corrupt(self, batch: Batch, k: Tensor, generator=None) -> Tensor:
        """x_k ~ q(x_k | x0) for steps k (B,) ∈ {1..T} (this family's time is the step)."""
        r_move, r_draw = batch.rand(generator, stream=0), batch.rand(generator, stream=1)
        return self.transitions.corrupt(batch.tokens, k, r_move, r_draw, batch.fixed)

    def draw_prior(self, r: Tensor) -> Tensor:
        """x_T ~ p(x_T) for uniforms r (B, L)."""
        return self.transitions.draw_prior(r)

    # -- network ---------------------------------------------------------------------------------
    def log_probs(self, model: nn.Module, xt: Tensor, k: Tensor, select: Tensor | None = None,
                  dtype: torch.dtype = torch.float64) -> Tensor:
        """log p̃_θ(x0 | x_t) in ``dtype``: (B, L, V), or (M, V) at the positions ``select`` holds; −inf off the
        data. k: (B,) the step of x_t (the network sees t = k/T)."""
        return F.log_softmax(self._logits(model, xt, k, select).to(dtype), dim=-1)

    def _logits(self, model: nn.Module, xt: Tensor, k: Tensor, select: Tensor | None) -> Tensor:
        """The network's logits in float32, −inf off the data: (B, L, V) or (M, V)."""
        tc = (k.double() / self.T).float() if self.time_conditioning else None
        logits = (model(xt, tc) if select is None else model(xt, tc, select=select)).float()
        logits[..., self.never] = -math.inf
        return logits

    def reverse_probs(self, p0: Tensor, xt: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """p(x_s | x_t) ∝ Q_{t|s}[·, x_t] ⊙ (p0 Q̄_s), normalised: (..., V) float64. p0 (..., V) is a
        distribution over x0 (one-hot: the true posterior; p̃_θ: the model's reverse step)."""
        p = self.transitions.into(xt, s, t) * self.transitions.mix(p0, s)
        return p / p.sum(-1, keepdim=True).clamp_min(1e-300)

    def step_kl(self, log_p0: Tensor, x0: Tensor, xt: Tensor, k: Tensor) -> Tensor:
        """KL(q(x_{k−1} | x_k, x0) ‖ p_θ(x_{k−1} | x_k)) at M positions: log_p0 (M, V), x0, xt, k (M,) -> (M,)."""
        if isinstance(self.transitions, GraphTransitions):
            return self.transitions.step_kl(log_p0, x0, xt, k)
        return self.step_kl_from_posteriors(log_p0, x0, xt, k)

    def step_kl_from_posteriors(self, log_p0: Tensor, x0: Tensor, xt: Tensor, k: Tensor) -> Tensor:
        """The same KL from the two posteriors written out over V (any transition matrices)."""
        onehot = F.one_hot(x0, self.vocab_size).double()
        q = self.reverse_probs(onehot, xt, k - 1, k)
        p = self.reverse_probs(log_p0.exp(), xt, k - 1, k)
        kl = torch.where(q > 0, q * (torch.log(q.clamp_min(1e-300)) - torch.log(p.clamp_min(1e-300))), 0.0)
        return kl.sum(-1).clamp_min(0.0)

    def step_terms(self, model: nn.Module, x0: Tensor, xt: Tensor, k: Tensor, loss_mask: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """The t = k term of L_vlb and the cross-entropy −log p̃_θ(x0 | x_k) per position: two (B, L) float64
        tensors, zero outside ``loss_mask``. For absorb only masked positions count: a visible token is x0,
        and its posterior is a point mass the model's step reproduces (carry-over, as in MDLM's SUBS)."""
        counted = loss_mask & (xt == self.mask_id) if self.transition == "absorb" else loss_mask.clone()
        kl = torch.zeros(x0.shape, dtype=torch.float64, device=x0.device)
        ce = torch.zeros_like(kl)
        if counted.any():
            kk = k[:, None].expand_as(x0)[counted]
            if isinstance(self.transitions, GraphTransitions):
                logits = self._logits(model, xt, k, counted)
                kl[counted], lp_x0 = self.transitions.step_kl_from_logits(logits, x0[counted], xt[counted], kk)
                ce[counted] = -lp_x0
            else:
                log_p0 = self.log_probs(model, xt, k, select=counted)
                kl[counted] = self.step_kl(log_p0, x0[counted], xt[counted], kk)
                ce[counted] = -log_p0.gather(-1, x0[counted][:, None]).squeeze(-1)
        return kl, ce

    def prior_terms(self, batch: Batch) -> Tensor:
        """KL(q(x_T | x0) ‖ p(x_T)) per position (B, L) float64, zero outside the loss mask."""
        kl = self.transitions.prior_kl(batch.tokens)
        return torch.where(batch.loss_mask, kl, torch.zeros_like(kl))

    # -- bound and loss --------------------------------------------------------------------------
    def _one_step(self, model, batch, generator):
        k = self.steps_from_uniforms(batch.time_uniforms(generator))
        xt = self.corrupt(batch, k, generator)
        return self.step_terms(model, batch.tokens, xt, k, batch.loss_mask)

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        kl, _ = self._one_step(model, batch, generator)
        return (self.T * kl + self.prior_terms(batch)).float()

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        kl, ce = self._one_step(model, batch, None)
        return (self.T * (kl + self.hybrid_lambda * ce) + self.prior_terms(batch)).float()

    def full_nelbo(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        """The bound with every one of the T terms evaluated (one x_t draw each; T network calls): (B,)."""
        B = batch.tokens.shape[0]
        total = self.prior_terms(batch).sum(-1) + self.sequence_terms(batch).double()
        for step in range(1, self.T + 1):
            k = torch.full((B,), step, dtype=torch.long, device=batch.tokens.device)
            xt = self.corrupt(Batch(batch.tokens, batch.loss_mask, batch.fixed), k, generator)
            total += self.step_terms(model, batch.tokens, xt, k, batch.loss_mask)[0].sum(-1)
        return total
