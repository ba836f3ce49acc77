"""Closed-form checks of the masked-diffusion bound with the exact (Bayes-optimal) denoiser."""

import math

import pytest
import torch
from conftest import TOY_L, TOY_MASK, TOY_PAD, TOY_V
from hypothesis import given, settings
from hypothesis import strategies as st

from difflm.diffusion import Batch, MaskedDiffusion, low_discrepancy_uniform
from difflm.models import Transformer, TransformerConfig
from difflm.schedules import SCHEDULES, build_schedule


def toy_process(schedule="loglinear", **kw) -> MaskedDiffusion:
    return MaskedDiffusion(TOY_V + 2, TOY_MASK, TOY_PAD, schedule=schedule, **kw)


def mc_nelbo(process, model, x0: torch.Tensor, K: int, seed: int = 0) -> tuple[float, float]:
    """Mean and standard error of K one-sample NELBO estimates of one sequence x0 (L,)."""
    x = x0[None].expand(K, -1)
    b = Batch(x, torch.ones_like(x, dtype=torch.bool), torch.zeros_like(x, dtype=torch.bool))
    b.u = low_discrepancy_uniform(0.37, K)
    vals = process.nelbo(model, b, generator=torch.Generator().manual_seed(seed))
    return float(vals.mean()), float(vals.std() / math.sqrt(K))


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_continuous_bound_is_tight_for_the_exact_denoiser(toy, schedule):
    """With the true posterior, the continuous-time NELBO of every sequence equals −log p(x0)."""
    seqs, p, model = toy
    proc = toy_process(schedule)
    for i in range(0, len(seqs), 4):
        mean, se = mc_nelbo(proc, model, seqs[i], K=4000, seed=i)
        assert abs(mean + math.log(p[i])) < 5 * se + 0.01, (i, mean, -math.log(p[i]), se)


def test_a_wrong_elbo_weight_is_caught(toy, monkeypatch):
    """Dropping the 1/(1−α) factor of the weight breaks the equality the test above checks."""
    seqs, p, model = toy
    proc = toy_process()
    right = proc.times

    def wrong(u):
        t, w = right(u)
        return t, w * (1 - proc.schedule.alpha(t))  # weight −α' instead of −α'/(1−α)

    monkeypatch.setattr(proc, "times", wrong)
    failures = 0
    for i in range(0, len(seqs), 4):
        mean, se = mc_nelbo(proc, model, seqs[i], K=4000, seed=i)
        failures += abs(mean + math.log(p[i])) >= 5 * se + 0.01
    assert failures >= 5


def test_one_step_discrete_bound_is_the_sum_of_marginal_entropies(toy):
    """T = 1: everything is masked and the bound is exactly −Σᵢ log p(x0ⁱ) (no Monte-Carlo noise)."""
    seqs, p, model = toy
    proc = toy_process(discrete_steps=1)
    marg = torch.stack([torch.stack([(p * (seqs[:, i] == v)).sum() for v in range(TOY_V)]) for i in range(TOY_L)])
    for i in range(len(seqs)):
        mean, se = mc_nelbo(proc, model, seqs[i], K=8)
        expected = -sum(math.log(marg[j, seqs[i, j]]) for j in range(TOY_L))
        assert se < 1e-6 and mean == pytest.approx(expected, abs=1e-4)


def test_discrete_time_bound_decreases_to_the_continuous_one(toy):
    seqs, p, model = toy

    def expected_bound(proc) -> float:
        return sum(float(p[i]) * mc_nelbo(proc, model, seqs[i], K=2000, seed=i)[0] for i in range(len(seqs)))

    H = float(-(p * p.log()).sum())
    b2, b8, b256 = (expected_bound(toy_process(discrete_steps=T)) for T in (2, 8, 256))
    assert b2 > b8 > H - 0.01
    assert b2 - H > 0.05  # the coarse chain pays a clear factorization gap
    assert abs(b256 - H) < 0.03


def test_corrupt_masks_the_right_fraction_and_never_fixed_positions():
    proc = toy_process("cosine")
    x0 = torch.zeros(4000, 16, dtype=torch.long)
    fixed = torch.zeros_like(x0, dtype=torch.bool)
    fixed[:, :3] = True
    t = torch.full((4000,), 0.6)
    xt = proc.corrupt(Batch(x0, ~fixed, fixed), t, torch.Generator().manual_seed(0))
    frac = (xt[:, 3:] == TOY_MASK).double().mean()
    assert abs(frac - (1 - proc.schedule.alpha(torch.tensor(0.6, dtype=torch.float64)))) < 0.01
    assert (xt[:, :3] == 0).all()


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@settings(max_examples=30, deadline=None)
@given(t=st.floats(0.01, 0.99))
def test_schedule_derivative_and_endpoints(name, t):
    s = build_schedule(name)
    tt = torch.tensor(t, dtype=torch.float64)
    h = 1e-6
    fd = (s.alpha(tt + h) - s.alpha(tt - h)) / (2 * h)
    assert float(s.alpha_prime(tt)) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)
    assert float(s.alpha(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(1.0)
    assert float(s.alpha(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)
    assert float(s.alpha_prime(tt)) <= 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), t=st.floats(0.05, 1.0))
def test_log_probs_at_selected_positions_equal_the_full_tensor_there(seed, t):
    """The samplers ask for x̂0 only where they draw; that route must give the full route's numbers."""
    g = torch.Generator().manual_seed(seed)
    V, L, B = 24, 12, 3
    proc = MaskedDiffusion(V, V - 2, V - 1)
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(vocab_size=V, max_len=L, n_layer=1, n_head=2, d_model=16)).eval()
    x0 = torch.randint(0, V - 2, (B, L), generator=g)
    xt = torch.where(torch.rand(B, L, generator=g) < t, torch.full_like(x0, V - 2), x0)
    select = torch.rand(B, L, generator=g) < 0.5  # masked and visible positions both
    tt = torch.full((B,), t)
    with torch.no_grad():
        full, part = proc.log_probs(model, xt, tt), proc.log_probs(model, xt, tt, select=select)
    assert part.shape == (int(select.sum()), V)
    assert torch.allclose(part, full[select], atol=1e-5) and torch.equal(part.isinf(), full[select].isinf())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_never_data_ids_renormalise_the_denoiser_exactly(seed):
    """``never`` (Tokenizer.unreachable_ids under tokenizer.exclude_unreachable): those rows get −inf and the rest
    is the same network renormalised, so each masked token's term drops by −log(1 − p_never) under the same draws
    (one route: the two processes' bound terms; the other: the mass the plain process gives those rows)."""
    V, L, B = 24, 12, 4
    unreachable = [3, 7, 8]
    plain, excl = MaskedDiffusion(V, V - 2, V - 1), MaskedDiffusion(V, V - 2, V - 1, never=unreachable)
    assert excl.never == plain.never + unreachable
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(vocab_size=V, max_len=L, n_layer=1, n_head=2, d_model=16)).eval()
    g = torch.Generator().manual_seed(seed)
    data = [i for i in range(V - 2) if i not in unreachable]
    x0 = torch.tensor(data)[torch.randint(0, len(data), (B, L), generator=g)]
    batch = Batch(tokens=x0, loss_mask=torch.ones(B, L, dtype=torch.bool), fixed=torch.zeros(B, L, dtype=torch.bool))
    with torch.no_grad():
        a = plain.bound_terms(model, batch, torch.Generator().manual_seed(1))
        b = excl.bound_terms(model, batch, torch.Generator().manual_seed(1))
        g1 = torch.Generator().manual_seed(1)  # the draws bound_terms makes, in its order
        t, w = plain.times(batch.time_uniforms(g1))
        xt = plain.corrupt(batch, t, g1)
        p_never = plain.log_probs(model, xt, t).exp()[..., unreachable].sum(-1)
        lp = excl.log_probs(model, xt, t)
    masked = xt == V - 2
    assert masked.any() and torch.isinf(lp[masked][:, unreachable]).all()
    want = (-torch.log1p(-p_never) * w.float()[:, None])[masked]
    assert torch.allclose((a - b)[masked], want, atol=1e-5) and torch.equal(a[~masked], b[~masked])
