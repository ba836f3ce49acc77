"""Samplers of the graph families (uniform diffusion, SEDD absorbing/uniform) with the exact concrete score
of the enumerable toy problem: their output distribution passes a chi-square test as steps grow, fails it
with one step (so the test has power), keeps given tokens, and the family/sampler check is a clear error."""

import pytest
import torch
from conftest import TOY_L, TOY_MASK, TOY_PAD, TOY_V, ExactScore, chi2_gof

from difflm.diffusion import MaskedDiffusion, ScoreEntropy, UniformDiffusion
from difflm.errors import DiffLMError
from difflm.sampling import Conditioning, get_sampler

N = 6000
V = TOY_V + 2


def setup(family, graph="absorb", schedule="loglinear"):
    if family == "uniform":
        proc = UniformDiffusion(V, TOY_MASK, TOY_PAD, schedule=schedule)
        return proc, "x0", False
    proc = ScoreEntropy(V, TOY_MASK, TOY_PAD, graph=graph, schedule=schedule)
    return proc, "sedd", proc.scale_by_sigma


SLOW = pytest.mark.slow  # Euler is first order: it needs many steps, minutes on 2 cores
CASES = [("uniform", "uniform", "ancestral", 128), ("sedd", "absorb", "analytic", 128),
         ("sedd", "uniform", "analytic", 128), pytest.param("sedd", "absorb", "euler", 512, marks=SLOW),
         pytest.param("sedd", "uniform", "euler", 512, marks=SLOW)]


@pytest.mark.parametrize("family,graph,sampler,steps", CASES)
def test_sampler_matches_the_true_distribution(toy, family, graph, sampler, steps):
    seqs, p, _ = toy
    proc, form, scale = setup(family, graph)
    model = ExactScore(seqs, p, proc.graph, proc.schedule, form, scale)
    out = get_sampler(sampler, proc)(model, proc, Conditioning.unconditional(N, TOY_L), steps=steps, seed=1)
    assert (out.tokens < TOY_V).all()  # data tokens only: no [MASK] survives the final step
    assert (out.nfe == steps).all()
    assert chi2_gof(out.tokens, seqs, p) > 1e-3


@pytest.mark.parametrize("family,graph,sampler", [("uniform", "uniform", "ancestral"),
                                                  ("sedd", "absorb", "analytic"), ("sedd", "uniform", "analytic")])
def test_one_step_is_detectably_wrong(toy, family, graph, sampler):
    seqs, p, _ = toy
    proc, form, scale = setup(family, graph)
    model = ExactScore(seqs, p, proc.graph, proc.schedule, form, scale)
    out = get_sampler(sampler, proc)(model, proc, Conditioning.unconditional(N, TOY_L), steps=1, seed=1)
    assert chi2_gof(out.tokens, seqs, p) < 1e-6


@pytest.mark.parametrize("family,graph,sampler", [("uniform", "uniform", "ancestral"), ("sedd", "absorb", "euler"),
                                                  ("sedd", "uniform", "analytic")])
def test_given_tokens_are_kept_and_same_seed_same_samples(toy, family, graph, sampler):
    seqs, p, _ = toy
    proc, form, scale = setup(family, graph)
    model = ExactScore(seqs, p, proc.graph, proc.schedule, form, scale)
    cond = Conditioning(torch.tensor([[2, 0, 1]] * 64), torch.tensor([[True, False, True]] * 64))
    smp = get_sampler(sampler, proc)
    a = smp(model, proc, cond, steps=16, seed=4).tokens
    assert (a[:, 0] == 2).all() and (a[:, 2] == 1).all() and (a < TOY_V).all()
    b = smp(model, proc, Conditioning(cond.tokens[:5], cond.fixed[:5]), steps=16, seed=4, rows=torch.arange(5)).tokens
    assert torch.equal(a[:5], b)


def test_a_sampler_of_another_family_is_a_clear_error():
    sedd = ScoreEntropy(V, TOY_MASK, TOY_PAD)
    with pytest.raises(DiffLMError, match="does not fit a sedd model; use one of: analytic, euler"):
        get_sampler("cached", sedd)
    with pytest.raises(DiffLMError, match="does not fit a masked model"):
        get_sampler("euler", MaskedDiffusion(V, TOY_MASK, TOY_PAD))
    assert get_sampler(None, UniformDiffusion(V, TOY_MASK, TOY_PAD)).name == "ancestral"


def absorbing_case(toy, sampler, seed, masked):
    """SEDD on the absorbing graph with the exact score, the named sampler, and 64 rows with a ``masked`` share of
    [MASK] among random data tokens; the generator carries on from there."""
    seqs, p, _ = toy
    proc, form, scale = setup("sedd", "absorb")
    model = ExactScore(seqs, p, proc.graph, proc.schedule, form, scale)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TOY_V, (64, TOY_L), generator=g)
    x = torch.where(torch.rand(x.shape, generator=g) < masked, torch.full_like(x, TOY_MASK), x)
    return proc, model, get_sampler(sampler, proc), x, g


@pytest.mark.parametrize("sampler,s", [("analytic", 0.3), ("analytic", 0.0), ("euler", 0.3)])
def test_absorbing_steps_compute_only_the_masked_positions_and_lose_nothing(toy, sampler, s):
    """A token on the absorbing graph never moves, so a step over the [MASK] positions alone is the same step:
    at every other position the full step is one-hot on the token held, and at [MASK] the two agree."""
    proc, model, smp, x, g = absorbing_case(toy, sampler, seed=0, masked=0.5)
    free = torch.rand(x.shape, generator=g) < 0.8
    moving = smp.moving(proc, x, free)
    assert torch.equal(moving, free & (x == TOY_MASK)) and moving.any() and (free & ~moving).any()
    full = smp.step_probs(model, proc, x, 0.6, s, free).clamp_min(0)
    full = full / full.sum(-1, keepdim=True)
    only = smp.step_probs(model, proc, x, 0.6, s, moving).clamp_min(0)
    only = only / only.sum(-1, keepdim=True)
    at_mask = (x == TOY_MASK)[free]
    torch.testing.assert_close(full[at_mask], only, rtol=1e-12, atol=1e-12)
    held = torch.nn.functional.one_hot(x[free & ~moving], V).double()
    torch.testing.assert_close(full[~at_mask], held, rtol=0, atol=1e-12)
    calls = []

    def spy(x, t=None, select=None):
        calls.append(select)
        full = ExactScore.forward(model, x, t)
        return full if select is None else full[select]

    model.forward = spy
    smp(model, proc, Conditioning(x, ~free), steps=4, seed=2)
    assert calls[0] is not None and torch.equal(calls[0], free)  # the run starts with every free position masked
    assert all(torch.equal(b & a, b) for a, b in zip(calls, calls[1:]))  # once a token lands it is never recomputed
    assert int(calls[-1].sum()) < int(free.sum())


def _written_out(g, lp, x, a_s, keep, exclude):
    """The posterior the mixture draw stands for, over V in float64 (the route ``step_probs`` takes)."""
    p = g.mix(lp.double().exp(), torch.tensor(a_s)) * g.kernel_into(x, keep)
    if exclude is not None:
        p[:, exclude] = 0.0
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("graph", ["uniform", "absorb"])
@pytest.mark.parametrize("seed", range(4))
def test_the_mixture_draw_has_the_written_out_posterior_as_its_law(graph, seed):
    """``draw_kernel_step`` maps a uniform to a token through three components (stay, from p̃, from π). Fed an even
    grid of K uniforms, each token's share of the grid must be its posterior probability to within the grid's
    resolution (each token's preimage is at most three intervals), at every row: the law, not a sample of it."""
    from difflm.diffusion.graphs import Graph
    from difflm.sampling.graph import draw_kernel_step

    gen = torch.Generator().manual_seed(seed)
    g = Graph(graph, V, [TOY_PAD] if graph == "absorb" else [TOY_MASK, TOY_PAD], mask_id=TOY_MASK)
    n = 12
    logits = 2.0 * torch.randn(n, V, generator=gen)
    logits[:, TOY_PAD] = -float("inf")
    if graph == "uniform":
        logits[:, TOY_MASK] = -float("inf")
    lp = torch.log_softmax(logits, -1)  # float32, as a network gives it
    x = torch.randint(0, TOY_V, (n,), generator=gen)
    if graph == "absorb":
        x[: n // 2] = TOY_MASK
    K = 20000
    u = (torch.arange(K, dtype=torch.float64) + 0.5) / K
    for a_s, keep, exclude in [(0.3, 0.8, None), (0.9, 0.1, None), (0.0, 0.5, None), (1.0, 0.6, None),
                               (1.0, 0.4, TOY_MASK if graph == "absorb" else None)]:
        want = _written_out(g, lp, x, a_s, keep, exclude)
        got = draw_kernel_step(g, lp.repeat_interleave(K, 0), x.repeat_interleave(K), a_s, keep, u.repeat(n),
                               exclude)
        freq = torch.nn.functional.one_hot(got.view(n, K), V).double().mean(1)
        ok = want.isfinite().all(-1)  # at α_s = 0 a token on the absorbing graph has no posterior (it cannot be)
        assert ok.sum() >= n // 2
        assert (freq - want)[ok].abs().max() <= 3.0 / K + 1e-9, (a_s, keep, exclude)
        if exclude is not None:
            assert (got != exclude).all()


@pytest.mark.parametrize("kind", ["uniform", "d3pm-absorb", "d3pm-uniform"])
def test_ancestral_samplers_draw_the_mixture_and_fall_back_to_the_written_out_step_under_a_temperature(kind):
    """The samplers take the mixture draw at temperature 1 (no posterior over V is written out), and the
    written-out route under a temperature; a temperature of 1 + 1e-12 on the written-out route gives the same
    law, so at a large batch the two agree on each position's marginal within sampling error."""
    from difflm.diffusion import D3PM

    proc = (UniformDiffusion(V, TOY_MASK, TOY_PAD) if kind == "uniform"
            else D3PM(V, TOY_MASK, TOY_PAD, transition=kind.split("-")[1], steps=50))
    table = torch.randn(TOY_L, V, generator=torch.Generator().manual_seed(0))

    def model(x, t=None, select=None):
        out = table.expand(*x.shape, V) + 0.5 * (x[..., None] == torch.arange(V)).float()
        return out if select is None else out[select]

    smp = get_sampler("ancestral", proc)
    calls = []
    written_out = smp.step_probs
    smp.step_probs = lambda *a: calls.append(1) or written_out(*a)
    n = 4000
    cond = Conditioning.unconditional(n, TOY_L)
    fast = smp(model, proc, cond, steps=8, seed=3).tokens
    assert not calls  # no posterior over V at temperature 1
    slow = smp(model, proc, cond, steps=8, seed=3, temperature=1 + 1e-12).tokens
    assert len(calls) == 8
    a = torch.nn.functional.one_hot(fast, V).double().mean(0)
    b = torch.nn.functional.one_hot(slow, V).double().mean(0)
    assert (a - b).abs().max() < 0.05
    assert not torch.equal(fast, slow)  # different routes from the same uniforms: the test compares laws


@pytest.mark.parametrize("sampler,s", [("analytic", 0.3), ("analytic", 0.0), ("euler", 0.3), ("euler", 0.0)])
def test_sedd_absorbing_steps_split_into_stay_or_jump_with_the_written_out_weights(toy, sampler, s):
    """Two routes to SEDD's step from [MASK]: the stay and jump weights (one log-sum-exp per position) against
    the step written out over V (``step_probs``), after the sampler's clipping, [MASK] exclusion at s = 0 and
    normalisation; then the stay-or-jump draw on an even grid of uniforms has that law."""
    from difflm.sampling.graph import draw_jump

    proc, model, smp, x, _ = absorbing_case(toy, sampler, seed=1, masked=0.6)
    sel = x == TOY_MASK
    t = 0.6
    want = smp.step_probs(model, proc, x, t, s, sel)
    if s == 0:
        want[:, TOY_MASK] = 0.0
    want = want.clamp_min(0.0)
    want = want / want.sum(-1, keepdim=True)
    ls, w_stay, w_jump = smp.jump_weights(model, proc, x, t, s, sel)
    w_stay = torch.zeros_like(w_stay) if s == 0 else w_stay.clamp_min(0.0)
    r = ls.double().exp()
    split = w_jump[:, None] * r / r.sum(-1, keepdim=True)
    split[:, TOY_MASK] = w_stay
    split = split / split.sum(-1, keepdim=True)
    torch.testing.assert_close(split, want, rtol=1e-6, atol=1e-7)
    if s > 0:
        assert (w_stay > 0).any()  # the step keeps some positions masked: both components are exercised
    K, n = 20000, 12
    u = (torch.arange(K, dtype=torch.float64) + 0.5) / K
    got = draw_jump(ls[:n].repeat_interleave(K, 0), x[sel][:n].repeat_interleave(K), w_stay[:n].repeat_interleave(K),
                    w_jump[:n].repeat_interleave(K), u.repeat(n))
    freq = torch.nn.functional.one_hot(got.view(n, K), V).double().mean(1)
    assert (freq - want[:n]).abs().max() <= 2.0 / K + 1e-6
