"""D3PM (Austin et al. 2021): the marginals from multiplying one-step matrices agree with the closed forms;
the posterior is Bayes' rule; D3PM-absorbing with β = 1/(T−t+1) is MDLM's T-step bound term for term; with
the exact x0 posterior the full T-step bound, enumerated exactly, is above the entropy and approaches the
continuous-time bound (which equals it) as T grows; the ancestral sampler with step skipping reproduces
the toy distribution (chi-square), and bad configurations are clear errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOY_L, TOY_MASK, TOY_PAD, TOY_V, ExactScore, chi2_gof
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from difflm.diffusion import D3PM, Batch, MaskedDiffusion, UniformDiffusion, build_process, low_discrepancy_uniform
from difflm.diffusion.d3pm import discretized_gaussian
from difflm.errors import DiffLMError
from difflm.evaluation import evaluate
from difflm.models import Transformer, TransformerConfig
from difflm.sampling import Conditioning, get_sampler

V = TOY_V + 2  # data tokens, [MASK], [PAD]
DATA = list(range(TOY_V))


def one_step_matrix(proc: D3PM, k: int) -> torch.Tensor:
    """Q_k over the whole vocabulary (V, V), written from the paper's definitions, not from the module."""
    b = float(proc.betas[k - 1])
    Q = torch.eye(V, dtype=torch.float64)
    d = torch.tensor(DATA)
    if proc.transition == "uniform":
        Q[d[:, None], d[None]] = (1 - b) * torch.eye(TOY_V, dtype=torch.float64) + b / TOY_V
    elif proc.transition == "absorb":
        Q[d, d] = 1 - b
        Q[d, TOY_MASK] = b
    else:
        Q[d[:, None], d[None]] = discretized_gaussian(TOY_V, b)
    return Q


def make(transition: str, T: int, **kw) -> D3PM:
    if transition == "gaussian":
        kw.setdefault("beta_min", 0.05)
        kw.setdefault("beta_max", 2.0)
    return D3PM(V, TOY_MASK, TOY_PAD, transition=transition, steps=T, **kw)


@pytest.mark.parametrize("transition", ["uniform", "absorb", "gaussian"])
def test_marginals_from_one_step_products_match_the_closed_forms(transition):
    proc = make(transition, 40)
    tr = proc.transitions
    eye = torch.eye(V, dtype=torch.float64)
    states = DATA + ([TOY_MASK] if transition == "absorb" else [])
    bar = eye.clone()
    for k in range(1, proc.T + 1):
        bar = bar @ one_step_matrix(proc, k)
        closed = tr.mix(eye[DATA], torch.tensor(k))  # rows x0 Q̄_k
        assert torch.allclose(closed[:, states], bar[DATA][:, states], atol=1e-12)
        assert torch.allclose(closed.sum(-1), torch.ones(TOY_V, dtype=torch.float64))
    # the multi-step column Q_{t|s}[·, x] used by step skipping is the product Q_{s+1}⋯Q_t
    s, t = 7, 23
    prod = eye.clone()
    for k in range(s + 1, t + 1):
        prod = prod @ one_step_matrix(proc, k)
    for x in states:
        col = tr.into(torch.tensor(x), torch.tensor(s), torch.tensor(t))
        assert torch.allclose(col[states], prod[states, x], atol=1e-12)


def test_schedules_of_the_paper():
    absorb = make("absorb", 50)  # jsd: ᾱ_t = 1 − t/T exactly, all masked at T
    assert torch.allclose(absorb.transitions.alpha_bar, 1 - torch.arange(51, dtype=torch.float64) / 50)
    uni = make("uniform", 1000)  # cosine on ᾱ
    ab = uni.transitions.alpha_bar
    assert (ab[1:] <= ab[:-1]).all() and ab[-1] < 1e-6 and abs(float(ab[500]) - 0.5) < 0.02
    lin = make("gaussian", 10, schedule="linear", beta_min=0.1, beta_max=1.0)
    assert torch.allclose(lin.betas, torch.linspace(0.1, 1.0, 10, dtype=torch.float64))
    Q = discretized_gaussian(8, 0.3)  # symmetric, stochastic, nearer ids more likely
    assert torch.allclose(Q, Q.T) and torch.allclose(Q.sum(1), torch.ones(8, dtype=torch.float64))
    assert Q[3, 4] > Q[3, 5] > Q[3, 6] > 0


@pytest.mark.parametrize("transition", ["uniform", "absorb", "gaussian"])
def test_posterior_is_bayes_rule(transition):
    proc = make(transition, 12)
    mats = [None] + [one_step_matrix(proc, k) for k in range(1, 13)]
    bars = [torch.eye(V, dtype=torch.float64)]
    for k in range(1, 13):
        bars.append(bars[-1] @ mats[k])
    states = DATA + ([TOY_MASK] if transition == "absorb" else [])
    for k in (1, 2, 6, 12):
        for x0, xt in itertools.product(DATA, states):
            if bars[k][x0, xt] == 0:
                continue
            want = bars[k - 1][x0] * mats[k][:, xt] / bars[k][x0, xt]  # q(x_{k-1} | x_k, x0)
            got = proc.reverse_probs(F.one_hot(torch.tensor(x0), V).double(), torch.tensor(xt),
                                     torch.tensor(k - 1), torch.tensor(k))
            assert torch.allclose(got, want, atol=1e-12), (k, x0, xt)


def tiny_net(time_conditioning: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=V, n_layer=1, n_head=2, d_model=32, max_len=8,
                                         time_conditioning=time_conditioning)).eval()


class ExactPosterior(nn.Module):
    """log p(x0ⁱ | x_t) for any D3PM transition, by enumerating the toy distribution with the likelihoods
    Q̄_k[x0, x_t] from the module's ``mix``; ``others=True`` leaves x_tⁱ out: p(x0ⁱ | x_t without position i),
    the p̃ that makes the x0-parameterised step (eq. 4) the true reverse step."""

    def __init__(self, seqs, p, proc: D3PM, others: bool = True) -> None:
        super().__init__()
        self.seqs, self.p, self.proc, self.others = seqs, p, proc, others

    def forward(self, x, t=None, select=None):
        if select is not None:
            return self(x, t)[select]
        B, L = x.shape
        n = len(self.seqs)
        k = torch.round(t.double() * self.proc.T).long()
        out = torch.empty(B, L, V, dtype=torch.float64)
        eye = torch.eye(V, dtype=torch.float64)
        for kk in k.unique().tolist():
            rows = (k == kk).nonzero()[:, 0]
            lik = self.proc.transitions.mix(eye[self.seqs], torch.tensor(kk))  # (n, L, V)
            held = lik[None].expand(len(rows), n, L, V).gather(-1, x[rows][:, None, :, None].expand(-1, n, L, 1))
            held = held.squeeze(-1)  # (b, n, L)
            for i in range(L):
                w = self.p * (torch.cat([held[..., :i], held[..., i + 1 :]], -1) if self.others else held).prod(-1)
                post = torch.zeros(len(rows), V, dtype=torch.float64).index_add_(1, self.seqs[:, i], w)
                out[rows, i] = torch.log(post / post.sum(-1, keepdim=True))
        return out.float()


def test_absorbing_d3pm_is_mdlm_discrete_time_term_by_term():
    T = 20
    d3pm = make("absorb", T, time_conditioning=False)
    mdlm = MaskedDiffusion(V, TOY_MASK, TOY_PAD, schedule="loglinear", discrete_steps=T)
    net = tiny_net(False)
    x0 = torch.randint(0, TOY_V, (16, 6), generator=torch.Generator().manual_seed(0))
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros_like(x0, dtype=torch.bool),
                  u=low_discrepancy_uniform(0.3, 16), rows=torch.arange(16), seed=5)
    with torch.no_grad():
        a, b = d3pm.bound_terms(net, batch), mdlm.bound_terms(net, batch)
    assert (a > 0).any()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def exact_bound(proc: D3PM, model, seqs, p) -> float:
    """E_{x0~p}[L_vlb(x0)] with every expectation over x_t enumerated (no Monte-Carlo), nats per sequence."""
    states = DATA + ([TOY_MASK] if proc.transition == "absorb" else [])
    xts = torch.tensor(list(itertools.product(states, repeat=TOY_L)))
    n0, nt = len(seqs), len(xts)
    x0 = seqs.repeat_interleave(nt, 0)
    xt = xts.repeat(n0, 1)
    w0 = p.repeat_interleave(nt)
    mask = torch.ones_like(x0, dtype=torch.bool)
    eye = torch.eye(V, dtype=torch.float64)
    total = float((p * proc.transitions.prior_kl(seqs).sum(-1)).sum())
    with torch.no_grad():
        for k in range(1, proc.T + 1):
            kk = torch.full((len(x0),), k)
            q = proc.transitions.mix(eye[x0], kk[:, None]).gather(-1, xt[..., None]).squeeze(-1).prod(-1)
            live = q > 0
            kl, _ = proc.step_terms(model, x0[live], xt[live], kk[live], mask[live])
            total += float((w0[live] * q[live] * kl.sum(-1)).sum())
    return total


@pytest.mark.parametrize("transition", ["uniform", "absorb"])
def test_full_bound_with_the_exact_posterior_approaches_the_continuous_bound(toy, transition):
    """The continuous-time bound of the matching family is tight (= H) for the exact score; D3PM's T-step
    bound is above it and the gap shrinks towards 0 as T grows (the factorised reverse step is exact only
    in the limit)."""
    seqs, p, _ = toy
    H = float(-(p * p.log()).sum())
    gaps = []
    for T in (4, 32, 256):
        proc = make(transition, T, alpha_schedule="loglinear")
        model = ExactScore(seqs, p, proc.graph, proc.alpha_schedule, "x0")
        gaps.append(exact_bound(proc, model, seqs, p) - H)
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-9, gaps
    assert gaps[2] < 0.1 * gaps[0] and gaps[2] < 0.01, gaps


def continuous_uniform_bound(proc: UniformDiffusion, model, seqs, p, n: int = 128) -> float:
    """E_{x0~p} of the continuous-time uniform-diffusion NELBO, ∫ σ(t) E_{x_t} Σ_i score entropy dt, with x_t
    enumerated and the integral by the midpoint rule in v, t = v³ (the integrand has a log singularity at 0)."""
    xts = torch.tensor(list(itertools.product(DATA, repeat=TOY_L)))
    x0, xt = seqs.repeat_interleave(len(xts), 0), xts.repeat(len(seqs), 1)
    w0 = p.repeat_interleave(len(xts))
    eye = torch.eye(V, dtype=torch.float64)
    total = 0.0
    with torch.no_grad():
        for j in range(n):
            v = (j + 0.5) / n
            t = torch.tensor(v**3, dtype=torch.float64)
            a = proc.schedule.alpha(t)
            sigma = -proc.schedule.alpha_prime(t) / a
            q = proc.graph.mix(eye[x0], a).gather(-1, xt[..., None]).squeeze(-1).prod(-1)
            se = proc.graph.score_entropy(proc.log_score(model, xt, t.expand(len(x0))), xt, x0, a.expand(len(x0)))
            total += float((w0 * q * se.sum(-1)).sum() * sigma) * 3 * v * v / n
    return total


def test_uniform_d3pm_approaches_the_continuous_bound_for_an_arbitrary_network(toy):
    """Not only for the exact posterior: for any x0-predictor the T-step D3PM bound tends to the continuous
    uniform-diffusion NELBO of the same predictor (two different formulas: posterior KLs vs score entropy)."""
    seqs, p, _ = toy
    net = tiny_net(True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adaLN-zero starts at zero: randomise it so the network depends on t
        for prm in net.parameters():
            if (prm == 0).all():
                prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
    cont = continuous_uniform_bound(UniformDiffusion(V, TOY_MASK, TOY_PAD, schedule="loglinear"), net, seqs, p)
    coarse = exact_bound(make("uniform", 16, alpha_schedule="loglinear"), net, seqs, p)
    fine = exact_bound(make("uniform", 1024, alpha_schedule="loglinear"), net, seqs, p)
    assert abs(fine - cont) < 0.005 < abs(coarse - cont), (coarse, fine, cont)


# 128 skipping steps take ~4x the time of 32: the default run keeps 32 (make test-slow: 128, and the uniform transition)
@pytest.mark.parametrize("transition,steps", [pytest.param("uniform", 128, marks=pytest.mark.slow),
                                              pytest.param("absorb", 128, marks=pytest.mark.slow), ("absorb", 32)])
def test_ancestral_sampler_with_step_skipping_matches_the_true_distribution(toy, transition, steps):
    seqs, p, _ = toy
    proc = make(transition, 256, alpha_schedule="loglinear")
    model = ExactScore(seqs, p, proc.graph, proc.alpha_schedule, "x0")
    smp = get_sampler(None, proc)
    assert smp.name == "ancestral"
    out = smp(model, proc, Conditioning.unconditional(6000, TOY_L), steps=steps, seed=2)
    assert (out.tokens < TOY_V).all() and (out.nfe == steps).all()
    assert chi2_gof(out.tokens, seqs, p) > 1e-3
    if transition == "uniform":
        one = smp(model, proc, Conditioning.unconditional(6000, TOY_L), steps=1, seed=2)
        assert chi2_gof(one.tokens, seqs, p) < 1e-6  # the test has power


def test_gaussian_ancestral_sampler_matches_the_true_distribution(toy):
    """The dense (discretized-Gaussian) matrices through the same sampler: with all T steps the samples
    follow the data (chi-square); skipping steps factorises bigger jumps, and the error grows as steps shrink."""
    seqs, p, _ = toy
    proc = make("gaussian", 128, beta_min=0.02, beta_max=0.5)
    assert float(proc.transitions.prior_kl(seqs).max()) < 1e-3  # Q̄_T is the uniform prior
    model = ExactPosterior(seqs, p, proc)
    smp = get_sampler(None, proc)
    code = torch.tensor([TOY_V**2, TOY_V, 1])
    truth = torch.zeros(len(seqs), dtype=torch.float64).index_put_(((seqs * code).sum(-1),), p)
    tv = {}
    for steps in (128, 16, 1):
        out = smp(model, proc, Conditioning.unconditional(6000, TOY_L), steps=steps, seed=4)
        assert (out.tokens < TOY_V).all() and (out.nfe == steps).all()
        emp = torch.bincount((out.tokens * code).sum(-1), minlength=len(seqs)).double() / len(out.tokens)
        tv[steps] = float((emp - truth).abs().sum() / 2)
        if steps == 128:
            assert chi2_gof(out.tokens, seqs, p) > 1e-3
    assert tv[128] < 0.03 and tv[128] < tv[16] < tv[1], tv


@pytest.mark.parametrize("transition", ["uniform", "gaussian", "absorb"])
def test_cross_entropy_optimum_is_not_the_bound_optimum_unless_absorbing(toy, transition):
    """The hybrid loss's CE term is minimised by p̃ = p(x0ⁱ | x_t); eq. 4 is the true reverse step (bound
    tight up to the factorisation) for p̃ = p(x0ⁱ | x_t without i). For uniform and gaussian matrices the
    CE optimum gives a looser bound — the reason the hybrid λ must stay small; for absorb they are equal."""
    seqs, p, _ = toy
    H = float(-(p * p.log()).sum())
    kw = {"beta_min": 0.02, "beta_max": 0.5} if transition == "gaussian" else {"alpha_schedule": "loglinear"}
    proc = make(transition, 32, **kw)
    tight = exact_bound(proc, ExactPosterior(seqs, p, proc, others=True), seqs, p)
    ce_opt = exact_bound(proc, ExactPosterior(seqs, p, proc, others=False), seqs, p)
    assert tight > H - 1e-9
    if transition == "absorb":
        assert abs(ce_opt - tight) < 1e-9, (ce_opt, tight)
    else:
        assert ce_opt > tight + 0.05, (ce_opt, tight, H)


def test_given_tokens_are_kept_and_errors_are_clear(toy):
    seqs, p, _ = toy
    proc = make("uniform", 16, alpha_schedule="loglinear")
    model = ExactScore(seqs, p, proc.graph, proc.alpha_schedule, "x0")
    cond = Conditioning(torch.tensor([[2, 0, 1]] * 32), torch.tensor([[True, False, True]] * 32))
    out = get_sampler("ancestral", proc)(model, proc, cond, steps=16, seed=1).tokens
    assert (out[:, 0] == 2).all() and (out[:, 2] == 1).all()
    with pytest.raises(DiffLMError, match="at most 16 sampling steps"):
        get_sampler("ancestral", proc)(model, proc, cond, steps=17)
    with pytest.raises(DiffLMError, match="does not fit a d3pm model; use one of: ancestral"):
        get_sampler("euler", proc)
    with pytest.raises(DiffLMError, match="unknown D3PM transition"):
        D3PM(V, TOY_MASK, TOY_PAD, transition="band")
    with pytest.raises(DiffLMError, match="not both"):
        D3PM(V, TOY_MASK, TOY_PAD, schedule="cosine", alpha_schedule="loglinear")
    with pytest.raises(DiffLMError, match="too many"):
        D3PM(20000, 0, 1, transition="gaussian", steps=1000)
    with pytest.raises(DiffLMError, match="kernel width.*beta_min"):
        D3PM(V, TOY_MASK, TOY_PAD, transition="gaussian", alpha_schedule="loglinear")
    with pytest.raises(DiffLMError, match="not a β schedule.*alpha_schedule"):
        D3PM(V, TOY_MASK, TOY_PAD, schedule="loglinear")
    with pytest.raises(DiffLMError, match=r"process.graph for process.type d3pm; valid keys here: alpha_sch"):
        build_process({"type": "d3pm", "graph": "absorb"}, vocab_size=V, special={"mask": TOY_MASK, "pad": TOY_PAD})
    with pytest.raises(DiffLMError, match="--all-steps applies to discrete-time families"):
        evaluate(tiny_net(False), MaskedDiffusion(V, TOY_MASK, TOY_PAD), None, all_steps=True)


def test_hybrid_loss_adds_lambda_times_the_cross_entropy():
    proc = make("uniform", 50, hybrid_lambda=0.0)
    hyb = make("uniform", 50, hybrid_lambda=0.5)
    net = tiny_net(True)
    x0 = torch.randint(0, TOY_V, (8, 5), generator=torch.Generator().manual_seed(1))
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros_like(x0, dtype=torch.bool),
                  u=low_discrepancy_uniform(0.1, 8), rows=torch.arange(8))
    with torch.no_grad():
        vlb, loss = proc.loss(net, batch), hyb.loss(net, batch)
        assert torch.allclose(vlb, proc.bound_terms(net, batch))
        k = proc.steps_from_uniforms(batch.u)
        xt = proc.corrupt(batch, k)
        ce = -proc.log_probs(net, xt, k).gather(-1, x0[..., None]).squeeze(-1)
    assert torch.allclose(loss - vlb, (0.5 * 50 * ce).float(), rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(loss.sum()))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["uniform", "absorb"]), st.sampled_from(["cosine", "jsd", "linear"]),
       st.integers(1, 60), st.integers(0, 10_000), st.floats(0.1, 5.0))
def test_closed_form_step_kl_equals_the_kl_of_the_written_out_posteriors(transition, schedule, T, seed, scale):
    """Two routes to each term of L_vlb: the one-pass closed form used in training, and the KL between the
    two posteriors materialised over the vocabulary."""
    proc = D3PM(V, TOY_MASK, TOY_PAD, transition=transition, steps=T, schedule=schedule, beta_min=0.01, beta_max=0.5)
    g = torch.Generator().manual_seed(seed)
    M = 64
    x0 = torch.randint(0, TOY_V, (M, 1), generator=g)
    k = torch.randint(1, T + 1, (M,), generator=g)
    xt = proc.transitions.corrupt(x0, k, torch.rand(M, 1, generator=g, dtype=torch.float64),
                                  torch.rand(M, 1, generator=g, dtype=torch.float64), None)[:, 0]
    logits = scale * torch.randn(M, V, generator=g, dtype=torch.float64)
    logits[:, [TOY_MASK, TOY_PAD]] = -math.inf
    lp = torch.log_softmax(logits, -1)
    fast = proc.step_kl(lp, x0[:, 0], xt, k)
    slow = proc.step_kl_from_posteriors(lp, x0[:, 0], xt, k)
    assert torch.allclose(fast, slow, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("transition", ["uniform", "absorb", "gaussian"])
def test_loss_gradient_is_finite_at_every_step(transition):
    """The never-data ids carry log p̃ = −inf and, at t = 1, (1 − ᾱ_0) = 0: a log-space bound that lets
    logaddexp(−inf, −inf) through has a NaN gradient, which the softmax spreads to every logit (training
    then diverges while the forward value stays right)."""
    proc = make(transition, 50)
    torch.manual_seed(0)
    logits = torch.randn(2, TOY_L, V, dtype=torch.float64, requires_grad=True)

    def model(x, t, select=None):
        return logits if select is None else logits[select]

    x0 = torch.randint(0, TOY_V, (2, TOY_L))
    everywhere = torch.ones_like(x0, dtype=torch.bool)
    mask_all = torch.full_like(x0, TOY_MASK)
    for k in (1, 2, 25, 50):
        kk = torch.full((2,), k)
        xt = mask_all if transition == "absorb" else proc.corrupt(Batch(x0, everywhere, None), kk)
        kl, ce = proc.step_terms(model, x0, xt, kk, everywhere)
        logits.grad = None
        (kl.sum() + proc.hybrid_lambda * ce.sum()).backward()
        assert torch.isfinite(logits.grad).all(), (transition, k)
        assert logits.grad.abs().sum() > 0


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["uniform", "absorb"]), st.sampled_from([10, 1000]), st.integers(0, 10_000),
       st.floats(0.1, 8.0))
def test_step_kl_from_float32_logits_equals_the_float64_route(transition, T, seed, scale):
    """Training's route (vocabulary-wide passes in float32, float64 sums and gathered entries) against
    ``step_kl`` on float64 log-probabilities: values and gradients, at a 3,000-token vocabulary."""
    Vb, mask = 3000, 2998
    proc = D3PM(Vb, mask, Vb - 1, transition=transition, steps=T)
    g = torch.Generator().manual_seed(seed)
    M = 48
    x0 = torch.randint(0, mask, (M, 1), generator=g)
    k = torch.randint(1, T + 1, (M,), generator=g)
    k[:2] = torch.tensor([1, T])  # both ends of the chain
    xt = proc.transitions.corrupt(x0, k, torch.rand(M, 1, generator=g, dtype=torch.float64),
                                  torch.rand(M, 1, generator=g, dtype=torch.float64), None)[:, 0]
    base = (scale * torch.randn(M, Vb, generator=g)).float()
    base[:, [mask, Vb - 1]] = -math.inf
    f32 = base.clone().requires_grad_(True)
    kl, lp_x0 = proc.transitions.step_kl_from_logits(f32, x0[:, 0], xt, k)
    f64 = base.double().requires_grad_(True)
    lp = torch.log_softmax(f64, -1)
    ref = proc.step_kl(lp, x0[:, 0], xt, k)
    assert torch.allclose(kl, ref, rtol=1e-4, atol=2e-6)
    assert torch.allclose(lp_x0, lp.gather(-1, x0).squeeze(-1), rtol=1e-6, atol=1e-6)
    (kl.sum() - 0.01 * lp_x0.sum()).backward()
    (ref.sum() - 0.01 * lp.gather(-1, x0).sum()).backward()
    assert torch.isfinite(f32.grad).all()
    assert torch.allclose(f32.grad.double(), f64.grad, rtol=1e-3, atol=1e-6)
