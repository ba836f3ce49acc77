"""Gaussian embedding diffusion (Diffusion-LM): the schedules' derivatives, q(z_t | e) against iterating the
one-step process, the posterior against Bayes' rule for Gaussians, DDIM(η=1) = DDPM step for step, and —
with the exact posterior-mean denoiser of an enumerable toy distribution on fixed embeddings — the NELBO is
above the entropy and near it, and DDPM, DDIM and DPM-Solver++(2M) (20 steps) reproduce the distribution."""

import math

import pytest
import torch
from conftest import TOY_L, TOY_MASK, TOY_PAD, TOY_V, chi2_gof
from torch import nn

from difflm.diffusion import Batch, GaussianDiffusion, build_process, low_discrepancy_uniform
from difflm.diffusion.gaussian import GAUSSIAN_SCHEDULES
from difflm.errors import DiffLMError
from difflm.models import Transformer, TransformerConfig
from difflm.sampling import Conditioning, get_sampler

V = TOY_V + 2


@pytest.mark.parametrize("name", sorted(GAUSSIAN_SCHEDULES))
def test_schedule_derivatives_and_ends(name):
    sch = GAUSSIAN_SCHEDULES[name]()
    t = torch.linspace(0.001, 0.999, 200, dtype=torch.float64)
    h = 1e-6
    fd = (sch.alpha_bar(t + h) - sch.alpha_bar(t - h)) / (2 * h)
    assert torch.allclose(sch.alpha_bar_prime(t), fd, rtol=1e-5, atol=1e-8)
    a = sch.alpha_bar(torch.linspace(0, 1, 1001, dtype=torch.float64))
    assert (a[1:] < a[:-1]).all() and (a > 0).all() and (a < 1).all()
    assert float(sch.snr(torch.tensor(0.0))) > 50 and float(a[-1]) < 1e-3
    assert (sch.snr_prime(t) < 0).all()


def test_marginal_is_the_product_of_one_step_transitions():
    """Iterating z_k = √α_{k|k−1} z_{k−1} + √(1 − α_{k|k−1}) ε from q(z_0 | e) gives mean √ᾱ_t e and variance
    1 − ᾱ_t exactly; the module's corrupt() samples that law (moments over 200k draws)."""
    proc = GaussianDiffusion(V, TOY_MASK, TOY_PAD, schedule="cosine", embed_dim=4)
    sch = proc.schedule
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    mean, var = torch.sqrt(sch.alpha_bar(grid[0])), 1 - sch.alpha_bar(grid[0])  # per unit of e
    for k in range(1, 101):
        a = sch.alpha_bar(grid[k]) / sch.alpha_bar(grid[k - 1])
        mean, var = torch.sqrt(a) * mean, a * var + (1 - a)
        assert torch.isclose(mean, torch.sqrt(sch.alpha_bar(grid[k])), atol=1e-12)
        assert torch.isclose(var, 1 - sch.alpha_bar(grid[k]), atol=1e-12)
    model = Transformer(TransformerConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, max_len=8, d_embed=4,
                                          time_conditioning=True))
    n = 50_000
    tokens = torch.full((n, 4), 1)
    batch = Batch(tokens, torch.ones_like(tokens, dtype=torch.bool), torch.zeros_like(tokens, dtype=torch.bool))
    t = torch.full((n,), 0.4, dtype=torch.float64)
    with torch.no_grad():
        z = proc.corrupt(batch, t, torch.Generator().manual_seed(0), model=model)
        e = proc.embeddings(model)[tokens]
    a = sch.alpha_bar(torch.tensor(0.4, dtype=torch.float64))
    zz = z.double().reshape(-1, 4)
    assert torch.allclose(zz.mean(0), math.sqrt(a) * e[0, 0].double(), atol=0.01)
    assert torch.allclose(zz.var(0), (1 - a).expand(4), rtol=0.02)


def test_posterior_is_bayes_rule_and_ddim_eta_one_is_the_ddpm_step():
    proc = GaussianDiffusion(V, TOY_MASK, TOY_PAD, schedule="sqrt")
    g = torch.Generator().manual_seed(1)
    x0, z, noise = (torch.randn(5, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for t, s in ((0.9, 0.5), (0.3, 0.29), (0.05, 0.0)):
        t, s = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
        mean, var = proc.posterior(x0, z, t, s)
        a_s = proc.schedule.alpha_bar(s)
        a_ts = proc.schedule.alpha_bar(t) / a_s
        # Bayes: prior z_s ~ N(√ᾱ_s x0, 1 − ᾱ_s), likelihood z_t | z_s ~ N(√α_{t|s} z_s, 1 − α_{t|s})
        prec = 1 / (1 - a_s) + a_ts / (1 - a_ts)
        bmean = (torch.sqrt(a_s) * x0 / (1 - a_s) + torch.sqrt(a_ts) * z / (1 - a_ts)) / prec
        assert torch.allclose(mean, bmean, atol=1e-10) and torch.isclose(var, 1 / prec, atol=1e-12)
        ddpm = get_sampler("ddpm", proc).update(proc, z, x0, t, s, noise, {})
        ddim = get_sampler("ddim", proc, eta=1.0).update(proc, z, x0, t, s, noise, {})
        assert torch.allclose(ddpm, ddim, atol=1e-10)


class ExactGaussianDenoiser(nn.Module):
    """x̂0 = E[e_{x0} | z_t] for the toy distribution over sequences with fixed embeddings, by enumeration."""

    def __init__(self, seqs, p, proc, E):
        super().__init__()
        self.seqs, self.p, self.proc = seqs, p, proc
        self.embed = nn.Embedding(V, E.shape[1])
        self.embed.weight.data.copy_(E)

    def forward(self, z, t, x0_prev=None):
        a = self.proc.schedule.alpha_bar(t.double())[:, None, None, None]  # (B,1,1,1)
        es = self.embed.weight.double()[self.seqs]  # (n, L, d)
        ll = -((z.double()[:, None] - torch.sqrt(a) * es[None]) ** 2).sum((-1, -2)) / (2 * (1 - a[..., 0, 0]))
        w = torch.softmax(ll + self.p.log()[None], -1)  # (B, n)
        return torch.einsum("bn,nld->bld", w, es).float()


def toy_embeddings(scale: float) -> torch.Tensor:
    E = torch.zeros(V, 2)
    for v in range(TOY_V):
        E[v] = scale * torch.tensor([math.cos(2 * math.pi * v / TOY_V), math.sin(2 * math.pi * v / TOY_V)])
    return E


@pytest.fixture(scope="module")
def exact(toy):
    seqs, p, _ = toy
    proc = GaussianDiffusion(V, TOY_MASK, TOY_PAD, schedule="sqrt", embed_dim=2)
    return seqs, p, proc, ExactGaussianDenoiser(seqs, p, proc, toy_embeddings(2.0))


def test_bound_with_the_exact_denoiser_is_above_the_entropy_and_near_it(exact):
    seqs, p, proc, model = exact
    H = float(-(p * p.log()).sum())
    n = 20_000
    idx = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    x0 = seqs[idx]
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros_like(x0, dtype=torch.bool),
                  u=low_discrepancy_uniform(0.37, n), rows=torch.arange(n), seed=3)
    with torch.no_grad():
        nelbo = proc.nelbo(model, batch)
    mean, se = float(nelbo.mean()), float(nelbo.std() / math.sqrt(n))
    assert mean > H - 3 * se, (mean, H, se)
    assert mean - H < 0.15, (mean, H, se)


@pytest.mark.parametrize("name,steps", [("ddpm", 200), ("ddim", 200), ("dpm-solver", 20)])
def test_samplers_with_the_exact_denoiser_match_the_distribution(exact, name, steps):
    seqs, p, proc, model = exact
    smp = get_sampler(name, proc, **({"eta": 1.0} if name == "ddim" else {}))
    out = smp(model, proc, Conditioning.unconditional(4000, TOY_L), steps=steps, seed=5)
    assert (out.tokens < TOY_V).all() and (out.nfe == steps).all()
    assert chi2_gof(out.tokens, seqs, p) > 1e-3
    if name == "ddpm":
        one = smp(model, proc, Conditioning.unconditional(4000, TOY_L), steps=1, seed=5)
        assert chi2_gof(one.tokens, seqs, p) < 1e-6  # the test has power


def test_given_tokens_are_kept_clamp_and_errors(exact):
    seqs, p, proc, model = exact
    cond = Conditioning(torch.tensor([[2, 0, 1]] * 16), torch.tensor([[True, False, True]] * 16))
    for name in ("ddpm", "ddim", "dpm-solver"):
        out = get_sampler(name, proc, clamp=True)(model, proc, cond, steps=10, seed=1).tokens
        assert (out[:, 0] == 2).all() and (out[:, 2] == 1).all() and (out < TOY_V).all()
    with pytest.raises(DiffLMError, match="unknown gaussian schedule"):
        GaussianDiffusion(V, TOY_MASK, TOY_PAD, schedule="quadratic")
    with pytest.raises(DiffLMError, match="sampler 'ddpm' has no option order; its options: clamp"):
        get_sampler("ddpm", proc, order=3)
    with pytest.raises(DiffLMError, match="does not fit a gaussian model"):
        get_sampler("analytic", proc)


@pytest.mark.parametrize("self_conditioning", [False, True])
def test_training_step_and_bound_on_a_real_network(self_conditioning):
    proc = build_process({"type": "gaussian", "embed_dim": 8, "self_conditioning": self_conditioning},
                         vocab_size=V, special={"mask": TOY_MASK, "pad": TOY_PAD})
    model = Transformer(TransformerConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, max_len=8, d_embed=8,
                                          time_conditioning=True, self_conditioning=self_conditioning))
    x0 = torch.randint(0, TOY_V, (8, 6), generator=torch.Generator().manual_seed(0))
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros_like(x0, dtype=torch.bool),
                  u=low_discrepancy_uniform(0.2, 8), rows=torch.arange(8), seed=1)
    loss = proc.loss(model, batch).sum()
    loss.backward()
    assert torch.isfinite(loss) and model.embed.weight.grad.abs().sum() > 0  # embeddings learn jointly
    with torch.no_grad():
        a, b = proc.nelbo(model, batch), proc.nelbo(model, batch)
    assert torch.equal(a, b) and torch.isfinite(a).all()  # keyed noise: the bound is a function of the batch



def test_t0_weight_adds_diffusion_lm_embedding_loss_at_t0_in_expectation():
    """x̂0 = c·z_t gives ‖e − x̂0‖² in closed form; with t0_weight w the simple loss gains w·mse(0) on average
    (rounding and the prior-mean term are keyed on the rows, so they cancel in the difference)."""
    c, w, n = 0.5, 3.0, 40_000

    class Shrink(nn.Module):
        def __init__(self, E):
            super().__init__()
            self.embed = nn.Embedding(V, E.shape[1])
            self.embed.weight.data.copy_(E)

        def forward(self, z, t, x0_prev=None):
            return c * z

    model = Shrink(toy_embeddings(2.0))
    x0 = (torch.arange(n) % TOY_V)[:, None]
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros_like(x0, dtype=torch.bool),
                  u=low_discrepancy_uniform(0.37, n), rows=torch.arange(n), seed=5)
    plain = GaussianDiffusion(V, TOY_MASK, TOY_PAD, schedule="sqrt", embed_dim=2)
    with_t0 = GaussianDiffusion(V, TOY_MASK, TOY_PAD, schedule="sqrt", embed_dim=2, t0_weight=w)
    a0 = float(plain.schedule.alpha_bar(torch.zeros((), dtype=torch.float64)))
    mse0 = 4.0 * (1 - c * math.sqrt(a0)) ** 2 + c * c * (1 - a0) * 2  # ‖e‖² = 4, d = 2
    with torch.no_grad():
        diff = (with_t0.loss(model, batch) - plain.loss(model, batch)).double()[:, 0]
    se = float(diff.std()) / math.sqrt(n)
    assert abs(float(diff.mean()) - w * mse0) < 4 * se + 1e-3, (float(diff.mean()), w * mse0, se)
    with pytest.raises(DiffLMError, match="t0_weight"):
        GaussianDiffusion(V, TOY_MASK, TOY_PAD, loss="elbo", t0_weight=1.0)
    with pytest.raises(DiffLMError, match="t0_weight"):
        GaussianDiffusion(V, TOY_MASK, TOY_PAD, t0_weight=-1.0)
