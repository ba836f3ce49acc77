"""Samplers on the enumerable toy problem with the exact denoiser: right distribution, cached ≡ ancestral,
given tokens untouched, and batch-size invariance."""

import math

import pytest
import torch
from conftest import TOY_L, TOY_MASK, TOY_PAD, TOY_V, chi2_gof
from hypothesis import given, settings
from hypothesis import strategies as st

from difflm.diffusion import MaskedDiffusion
from difflm.errors import DiffLMError
from difflm.rng import uniform
from difflm.sampling import Conditioning, get_sampler
from difflm.sampling.base import Trajectory
from difflm.sampling.categorical import nucleus, sample_categorical

N = 6000


def proc(**kw):
    return MaskedDiffusion(TOY_V + 2, TOY_MASK, TOY_PAD, **kw)


@pytest.mark.parametrize("name", ["ancestral", "cached", "first-hitting"])
def test_sampler_matches_the_true_distribution(toy, name):
    seqs, p, model = toy
    out = get_sampler(name, proc())(model, proc(), Conditioning.unconditional(N, TOY_L), steps=256, seed=1)
    assert chi2_gof(out.tokens, seqs, p) > 1e-3


def test_too_few_steps_is_detectably_wrong(toy):
    """One step unmasks every position independently: the chi-square test must notice (it has power)."""
    seqs, p, model = toy
    out = get_sampler("ancestral", proc())(model, proc(), Conditioning.unconditional(N, TOY_L), steps=1, seed=1)
    assert chi2_gof(out.tokens, seqs, p) < 1e-6


def test_cached_equals_ancestral_with_fewer_calls(toy):
    seqs, p, model = toy
    cond = Conditioning.unconditional(500, TOY_L)
    a = get_sampler("ancestral", proc())(model, proc(), cond, steps=128, seed=3)
    c = get_sampler("cached", proc())(model, proc(), cond, steps=128, seed=3)
    assert torch.equal(a.tokens, c.tokens)  # exact denoiser is time-free: the chains are the same
    assert (a.nfe == 128).all()
    assert (c.nfe <= TOY_L + 1).all() and c.nfe.float().mean() < 5


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_first_hitting_times_follow_the_survival_law(schedule):
    """n masked tokens at t all survive to s with probability ((1 − α_s)/(1 − α_t))^n: the sampled next time s
    satisfies it at every quantile u (the bisection inverts it), and for loglinear s = t·u^{1/n} exactly."""
    from difflm.sampling.masked import FirstHitting

    pr = proc(schedule=schedule)
    g = torch.Generator().manual_seed(0)
    t = torch.rand(200, generator=g, dtype=torch.float64) * 0.98 + 0.02
    n = torch.randint(1, 50, (200,), generator=g)
    u = torch.rand(200, generator=g, dtype=torch.float64)
    s = FirstHitting.next_time(pr, t, n, u)
    a = pr.schedule.alpha
    assert (s <= t).all() and (s >= 0).all()
    assert torch.allclose(((1 - a(s)) / (1 - a(t))) ** n.double(), u, atol=1e-9)
    if schedule == "loglinear":
        assert torch.allclose(s, t * u ** (1 / n.double()), atol=1e-12)


def test_first_hitting_calls_the_network_once_per_token(toy):
    seqs, p, model = toy
    fixed = torch.tensor([[False, True, False]] * 20 + [[False] * 3] * 20)
    cond = Conditioning(torch.tensor([[0, 1, 2]] * 40), fixed)
    out = get_sampler("first-hitting", proc())(model, proc(), cond, steps=1, seed=2)
    assert (out.nfe[:20] == 2).all() and (out.nfe[20:] == 3).all() and (out.tokens[:20, 1] == 1).all()


@pytest.mark.parametrize("name", ["ancestral", "first-hitting"])
def test_batch_size_does_not_change_samples(toy, name):
    seqs, p, model = toy
    smp = get_sampler(name, proc())
    full = smp(model, proc(), Conditioning.unconditional(8, TOY_L), steps=16, seed=9).tokens
    parts = [smp(model, proc(), Conditioning.unconditional(len(r), TOY_L), steps=16, seed=9,
                 rows=torch.tensor(r)).tokens for r in ([0], [1, 2, 3], [4, 5, 6, 7])]
    assert torch.equal(full, torch.cat(parts))


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(["ancestral", "cached"]), steps=st.integers(1, 12), join=st.integers(0, 12),
       seeds=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), fixed=st.lists(st.booleans(), min_size=TOY_L,
                                                                                     max_size=TOY_L))
def test_rows_that_join_a_running_batch_get_what_they_get_alone(toy, name, steps, join, seeds, fixed):
    """Continuous batching: rows of a second request begin ``join`` steps after the first's, share every step
    with it from then on, and leave when done; each row ends with the tokens and calls it has sampled alone."""
    seqs, p, model = toy
    smp = get_sampler(name, proc())
    conds = [Conditioning.unconditional(3, TOY_L),
             Conditioning(torch.tensor([[0, 1, 2]] * 2), torch.tensor([fixed] * 2))]
    alone = [smp(model, proc(), c, steps=steps, seed=sd) for c, sd in zip(conds, seeds)]
    traj, owner, got = smp.begin(proc(), conds[0], steps=steps, seed=seeds[0]), [0] * 3, {0: [], 1: []}
    pending, k = True, 0
    while len(traj) or pending:
        if pending and k >= min(join, steps):  # the second request arrives (at the latest when the first is done)
            traj = Trajectory.cat([traj, smp.begin(proc(), conds[1], steps=steps, seed=seeds[1])])
            owner, pending = owner + [1] * 2, False
        traj = smp.advance(model, proc(), traj, steps=steps)
        k += 1
        for i in traj.done.nonzero().squeeze(-1).tolist():
            got[owner[i]].append((traj.x[i], traj.nfe[i]))
        keep = ~traj.done
        traj, owner = traj.take(keep), [o for o, d in zip(owner, keep.tolist()) if d]
    for j in (0, 1):
        assert torch.equal(torch.stack([x for x, _ in got[j]]), alone[j].tokens)
        assert torch.equal(torch.stack([n for _, n in got[j]]), alone[j].nfe)


@settings(max_examples=25, deadline=None)
@given(fixed=st.lists(st.booleans(), min_size=TOY_L, max_size=TOY_L),
       given_tokens=st.lists(st.integers(0, TOY_V - 1), min_size=TOY_L, max_size=TOY_L),
       name=st.sampled_from(["ancestral", "cached", "first-hitting"]), steps=st.integers(1, 20),
       seed=st.integers(0, 10**6))
def test_fixed_positions_never_change(toy, fixed, given_tokens, name, steps, seed):
    seqs, p, model = toy
    cond = Conditioning(torch.tensor([given_tokens] * 4), torch.tensor([fixed] * 4))
    out = get_sampler(name, proc())(model, proc(), cond, steps=steps, seed=seed).tokens
    f = cond.fixed
    assert torch.equal(out[f], cond.tokens[f])
    assert (out < TOY_V).all()  # every mask was filled with a data token


def test_conditional_sampling_matches_the_true_conditional(toy):
    """Suffix conditioning: x2 given; the samples of (x0, x1) follow p(x0, x1 | x2)."""
    seqs, p, model = toy
    cond = Conditioning(torch.tensor([[0, 0, 2]] * N), torch.tensor([[False, False, True]] * N))
    out = get_sampler("ancestral", proc())(model, proc(), cond, steps=256, seed=5).tokens
    keep = seqs[:, 2] == 2
    sub_p = torch.where(keep, p, torch.zeros_like(p))
    assert chi2_gof(out, seqs, sub_p / sub_p.sum()) > 1e-3


def test_sampler_family_mismatch_is_a_clear_error():
    from difflm.diffusion import Autoregressive

    with pytest.raises(DiffLMError, match="does not fit"):
        get_sampler("cached", Autoregressive(4, 3, 1, 0))
    with pytest.raises(DiffLMError, match="unknown sampler"):
        get_sampler("nope", proc())


def test_cached_sampler_refuses_a_time_conditioned_network(toy):
    with pytest.raises(DiffLMError, match="time-free"):
        get_sampler("cached", proc())(toy[2], proc(time_conditioning=True), Conditioning.unconditional(1, TOY_L),
                                      steps=4)


def test_counter_rng_is_uniform_and_row_keyed():
    u = uniform(7, torch.arange(64), 3, 512)
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(uniform(7, torch.tensor([5, 9]), 3, 512), u[[5, 9]])
    assert not torch.equal(uniform(8, torch.arange(2), 3, 512), u[:2])
    assert not torch.equal(uniform(7, torch.arange(2), 4, 512), u[:2])


def test_float64_categorical_and_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    u = uniform(0, torch.arange(1), 0, 200000)[0]
    x = sample_categorical(probs.expand(len(u), -1), u)
    freq = torch.bincount(x, minlength=4).double() / len(u)
    assert torch.allclose(freq, probs, atol=0.005)
    kept = nucleus(probs[None], 0.8)[0]
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64))
    tiny = torch.tensor([1e-12, 1 - 1e-12], dtype=torch.float64)  # float64: a 1e-12 token is still drawable
    assert sample_categorical(tiny, torch.tensor(5e-13, dtype=torch.float64)) == 0


@pytest.mark.parametrize("name,opts", [("confidence", {}), ("confidence", {"score": "margin", "block": 2}),
                                       ("confidence", {"score": "entropy"}), ("threshold", {"threshold": 0.6}),
                                       ("threshold", {"block": 1})])
def test_confidence_decoding_fills_every_mask_keeps_given_tokens_and_is_batch_invariant(toy, name, opts):
    seqs, p, model = toy
    smp = get_sampler(name, proc(), **opts)
    fixed = torch.tensor([[False, True, False]] * 4 + [[False] * 3] * 4)
    cond = Conditioning(torch.tensor([[0, 2, 0]] * 8), fixed)
    out = smp(model, proc(), cond, steps=2, seed=4)
    assert (out.tokens < TOY_V).all() and (out.tokens[:4, 1] == 2).all()
    if name == "confidence":  # 2 steps: 2 calls; with blocks of 2, one call for each of the 2 blocks
        assert (out.nfe == 2).all()
    else:
        assert (out.nfe <= (~fixed).sum(-1)).all()
    part = smp(model, proc(), cond.rows(slice(3, 6)), steps=2, seed=4, rows=torch.arange(3, 6))
    assert torch.equal(part.tokens, out.tokens[3:6])


def test_confidence_decoding_prefers_the_sure_position(toy):
    """With one token decoded per call, the first call must decode the position whose x̂0 is most peaked."""
    seqs, p, model = toy
    x = torch.full((1, TOY_L), TOY_MASK)
    logp = proc().log_probs(model, x, None)[0].double()
    best = int(logp.exp().max(-1).values.argmax())
    seen = []
    smp = get_sampler("confidence", proc(), score="margin")
    smp(model, proc(), Conditioning.unconditional(1, TOY_L), steps=TOY_L, seed=0,
        on_step=lambda info: seen.append(info.tokens.clone()))
    first = (seen[0][0] != TOY_MASK).nonzero().squeeze(-1).tolist()
    assert first == [best], (first, best, logp.exp())
    with pytest.raises(DiffLMError, match="unknown confidence score"):
        get_sampler("confidence", proc(), score="luck")


def test_greedy_confidence_in_blocks_of_one_is_left_to_right_argmax(toy):
    """Two routes: the sampler with ``greedy`` and blocks of 1, and argmax decoding position by position."""
    seqs, p, model = toy
    x = torch.full((1, TOY_L), TOY_MASK)
    for i in range(TOY_L):
        x[0, i] = proc().log_probs(model, x, None)[0, i].argmax()
    smp = get_sampler("confidence", proc(), greedy=True, block=1)
    out = smp(model, proc(), Conditioning.unconditional(5, TOY_L), steps=TOY_L, seed=3, temperature=7.0)
    assert torch.equal(out.tokens, x.expand(5, -1)) and (out.nfe == TOY_L).all()


def test_blocks_begin_after_the_prompt(toy):
    """A prompt at position 0 and blocks of 2: the two free positions form one block, filled by one call; counted
    from position 0 they would be two blocks, one call each."""
    seqs, p, model = toy
    cond = Conditioning(torch.tensor([[1, 0, 0]] * 3), torch.tensor([[True, False, False]] * 3))
    out = get_sampler("confidence", proc(), block=2)(model, proc(), cond, steps=1, seed=0)
    assert (out.nfe == 1).all() and (out.tokens[:, 0] == 1).all()


def test_remdm_with_eta_zero_is_the_ancestral_sampler(toy):
    seqs, p, model = toy
    cond = Conditioning.unconditional(300, TOY_L)
    a = get_sampler("ancestral", proc())(model, proc(), cond, steps=32, seed=6)
    r = get_sampler("remdm", proc(), eta=0.0)(model, proc(), cond, steps=32, seed=6)
    assert torch.equal(a.tokens, r.tokens)


@pytest.mark.parametrize("strategy,eta", [("cap", 0.05), ("rescale", 0.5)])
def test_remdm_keeps_the_marginals_so_the_exact_denoiser_samples_the_distribution(toy, strategy, eta):
    """ReMDM's step has MDLM's marginals for any σ_t ≤ σ_max: with the exact denoiser and fine steps (σ_max
    shrinks with the step) the samples still follow p, while tokens really were re-masked along the way.
    At 64 steps and full rescale the factorization error of simultaneous changes is detectable (test power)."""
    seqs, p, model = toy
    remasked = []

    def watch(info):
        remasked.append(int((info.tokens == TOY_MASK).sum()))

    smp = get_sampler("remdm", proc(), eta=eta, strategy=strategy)
    out = smp(model, proc(), Conditioning.unconditional(N, TOY_L), steps=256, seed=8, on_step=watch)
    assert (out.tokens < TOY_V).all()
    assert chi2_gof(out.tokens, seqs, p) > 1e-3
    assert any(b > a for a, b in zip(remasked, remasked[1:]))  # the mask count went up at some step
    coarse = get_sampler("remdm", proc(), eta=1.0, strategy="rescale")
    coarse_out = coarse(model, proc(), Conditioning.unconditional(N, TOY_L), steps=64, seed=8)
    assert chi2_gof(coarse_out.tokens, seqs, p) < 1e-4
    with pytest.raises(DiffLMError, match="strategy"):
        get_sampler("remdm", proc(), strategy="loop")


def test_mask_predict_with_one_iteration_is_one_shot_argmax(toy):
    seqs, p, model = toy
    cond = Conditioning(torch.tensor([[0, 1, 2]] * 6), torch.tensor([[False, True, False]] * 3 + [[False] * 3] * 3))
    out = get_sampler("mask-predict", proc())(model, proc(), cond, steps=1, seed=0)
    x0 = cond.initial(TOY_MASK)
    logp = proc().log_probs(model, x0, torch.ones(6))
    want = torch.where(cond.fixed, cond.tokens, logp.argmax(-1))
    assert torch.equal(out.tokens, want) and (out.nfe == 1).all()


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(1, 6), seed=st.integers(0, 10**6), draw=st.booleans(),
       fixed=st.lists(st.booleans(), min_size=TOY_L, max_size=TOY_L))
def test_mask_predict_fills_every_mask_keeps_the_given_tokens_and_is_batch_invariant(toy, steps, seed, draw, fixed):
    seqs, p, model = toy
    smp = get_sampler("mask-predict", proc(), draw=draw)
    cond = Conditioning(torch.tensor([[2, 0, 1]] * 5), torch.tensor([fixed] * 5))
    out = smp(model, proc(), cond, steps=steps, seed=seed)
    assert (out.tokens < TOY_V).all() and torch.equal(out.tokens[cond.fixed], cond.tokens[cond.fixed])
    assert (out.nfe == steps).all()
    part = smp(model, proc(), cond.rows(slice(3, 5)), steps=steps, seed=seed, rows=torch.tensor([3, 4]))
    assert torch.equal(part.tokens, out.tokens[3:])


@settings(max_examples=10, deadline=None)
@given(steps=st.integers(2, 6), fixed=st.lists(st.booleans(), min_size=TOY_L, max_size=TOY_L))
def test_mask_predict_from_a_draft_of_its_own_first_iteration_is_mask_predict(toy, steps, fixed):
    """Two routes: Mask-Predict from all masks, and Mask-Predict started at iteration 1 from the draft its
    iteration 0 writes (the argmax of one all-masked pass) give the same tokens at the same cost."""
    seqs, p, model = toy
    cond = Conditioning(torch.tensor([[2, 0, 1]] * 4), torch.tensor([fixed] * 4))
    logp = proc().log_probs(model, cond.initial(TOY_MASK), torch.ones(4))
    draft = Conditioning(torch.where(cond.fixed, cond.tokens, logp.argmax(-1)), cond.fixed)
    plain = get_sampler("mask-predict", proc())(model, proc(), cond, steps=steps, seed=0)
    boot = get_sampler("mask-predict", proc(), start=1)(model, proc(), draft, steps=steps, seed=0)
    assert torch.equal(plain.tokens, boot.tokens) and torch.equal(plain.nfe, boot.nfe)


def test_mask_predict_from_a_draft_keeps_its_most_probable_tokens_and_costs_1_plus_t_minus_s(toy):
    seqs, p, model = toy
    cond = Conditioning.unconditional(4, TOY_L)
    logp = proc().log_probs(model, cond.initial(TOY_MASK), torch.ones(4))
    logp[..., TOY_V:] = math.inf  # the draft: each position's least probable real token
    bad = logp.argmin(-1)
    out = get_sampler("mask-predict", proc(), start=2)(model, proc(), Conditioning(bad, cond.fixed), steps=3)
    assert (out.nfe == 1 + 3 - 2).all()
    # iteration 2 of 3 re-masks ⌊3·1/3⌋ = 1 position: the other two keep the draft's tokens, however improbable
    assert ((out.tokens == bad).sum(-1) >= 2).all()
    plain = get_sampler("mask-predict", proc())(model, proc(), cond, steps=3).tokens
    assert not torch.equal(out.tokens, plain)
    with pytest.raises(DiffLMError, match="leaves no iteration"):
        get_sampler("mask-predict", proc(), start=3)(model, proc(), cond, steps=3)


def test_mask_predict_remasks_decoded_tokens_of_low_probability():
    """A network sure of position 0 and unsure of position 1 at the first iteration, then sure of position 1 once
    position 0 is seen: with T = 2 the unsure token is re-masked and predicted again (one-shot keeps it)."""

    class Net(torch.nn.Module):
        def forward(self, x, t=None, select=None, **kw):
            B, L = x.shape
            out = torch.zeros(B, L, TOY_V + 2)
            out[:, 0, 0] = 5.0  # position 0: token 0, sure
            seen = (x[:, 0] == 0).float()[:, None]
            out[:, 1, 1] = 0.2 + 5 * seen  # position 1: 1 vs 2 nearly even until position 0 is decoded
            out[:, 1, 2] = 0.3 - 5 * seen
            out[:, 2, 2] = 5.0
            return out if select is None else out[select]

    cond = Conditioning.unconditional(1, TOY_L)
    one = get_sampler("mask-predict", proc())(Net(), proc(), cond, steps=1).tokens
    two = get_sampler("mask-predict", proc())(Net(), proc(), cond, steps=2).tokens
    assert one.tolist() == [[0, 2, 2]] and two.tolist() == [[0, 1, 2]]
