"""Block diffusion (BD3-LM): the one-pass [x_t, x0] training input against block-by-block and KV-cached
evaluation, the two limits of the bound (block size L = MDLM, block size 1 = autoregressive), the block
sampler's distribution with the exact denoiser, KV-cached = uncached sampling, and [EOS]-stopped lengths."""

import math

import markov
import pytest
import torch
import torch.nn.functional as F
from conftest import MARKOV_L, TOY_L, TOY_MASK, TOY_PAD, TOY_V, chi2_gof, markov_run, one_line_error
from torch import nn

from difflm.data import build_dataset
from difflm.diffusion import Batch, BlockDiffusion, MaskedDiffusion
from difflm.diffusion.block import block_causal
from difflm.errors import DiffLMError
from difflm.evaluation import evaluate
from difflm.models import Transformer, TransformerConfig
from difflm.models.transformer import KVCache
from difflm.pipeline import DiffusionLM
from difflm.sampling import Conditioning, get_sampler
from difflm.training.trainer import Trainer

V, MASK, PAD, BOS, EOS = 12, 8, 9, 10, 11


def net(max_len: int = 32, seed: int = 0, shift: bool = False) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(TransformerConfig(vocab_size=V, max_len=max_len, n_layer=2, n_head=2, d_model=32, shift=shift))
    for p in m.parameters():  # untrained but not degenerate
        p.data.normal_(0, 0.15)
    return m.eval()


def proc(block_size: int, attention: str = "full") -> BlockDiffusion:
    return BlockDiffusion(V, MASK, PAD, BOS, block_size=block_size, eos_id=EOS, attention=attention)


def batch(x0: torch.Tensor, seed: int = 0) -> Batch:
    b = Batch(x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros_like(x0, dtype=torch.bool))
    b.u, b.rows, b.seed = torch.rand(x0.shape[0], dtype=torch.float64), torch.arange(x0.shape[0]), seed
    return b


def test_training_mask_is_bd3lms_figure_2():
    L, S = 6, 2
    M = proc(S).training_mask(L)
    for q in range(2 * L):
        for k in range(2 * L):
            qb, kb = (q % L) // S, (k % L) // S
            if q < L:  # an x_t query: its own noisy block, and the clean blocks before it
                want = (k < L and kb == qb) or (k >= L and kb < qb)
            else:  # an x0 query: clean blocks up to its own, never x_t
                want = k >= L and kb <= qb
            assert bool(M[q, k]) == want, (q, k)


def test_one_pass_equals_block_by_block_and_kv_cached():
    """The logits the loss uses (all blocks in one pass over [x_t, x0]) are those of each block seen alone
    after its clean prefix, recomputed or read from the KV cache."""
    L, S = 12, 4
    model, p = net(), proc(S)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 8, (3, L), generator=g)
    xt = torch.where(torch.rand(3, L, generator=g) < 0.5, torch.full_like(x0, MASK), x0)
    with torch.no_grad():
        one = p.denoiser_logits(model, xt, x0)
        cache = KVCache(len(model.blocks))
        for a in range(0, L, S):
            prefix = torch.cat([x0[:, :a], xt[:, a : a + S]], 1)
            blk = torch.arange(a + S) // S
            alone = model(prefix, attn_mask=block_causal(blk, blk))[:, a:].float()
            cached = model(xt[:, a : a + S], cache=cache, store=0).float()
            model(x0[:, a : a + S], cache=cache)  # commit the clean block
            for other in (alone, cached):
                other[..., p.never] = -math.inf
                torch.testing.assert_close(one[:, a : a + S], other, atol=1e-4, rtol=1e-4)
        assert cache.length == L


def test_clean_causal_training_mask_by_hand():
    S = 2
    xt = torch.tensor([[3, MASK, MASK, 5]])
    M = proc(S, "clean-causal").clean_causal_training_mask(xt)[0, 0].int()
    want = torch.tensor([
        # x_t: 0  1  2  3   x0: 0  1  2  3
        [1, 0, 0, 0, 0, 0, 0, 0],  # clean x_t 0 (block 0): itself
        [1, 1, 0, 0, 0, 0, 0, 0],  # [MASK] 1: the clean 0 of its block and itself
        [0, 0, 1, 0, 1, 1, 0, 0],  # [MASK] 2 (block 1): itself and x0 block 0
        [0, 0, 0, 1, 1, 1, 0, 0],  # clean 3: not the [MASK] at 2; x0 block 0
        [0, 0, 0, 0, 1, 0, 0, 0],  # x0 causally, never x_t
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1]])
    assert torch.equal(M, want)
    with pytest.raises(DiffLMError, match="full or clean-causal"):
        proc(S, "clean-causal-masks")


@pytest.mark.parametrize("shift", [False, True])
def test_clean_causal_one_pass_equals_block_by_block_and_kv_cached(shift):
    """Under attention clean-causal the training pass over [x_t, x0] gives each block the logits it gets after its
    clean prefix read causally, recomputed under ``clean_causal_mask`` or read from a cache the clean blocks were
    written to causally; with model.shift a block's first token is predicted from the clean token before it."""
    L, S = 12, 4
    model, p = net(shift=shift), proc(S, "clean-causal")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 8, (3, L), generator=g)
    xt = torch.where(torch.rand(3, L, generator=g) < 0.5, torch.full_like(x0, MASK), x0)
    with torch.no_grad():
        one = p.denoiser_logits(model, xt, x0)
        assert not torch.allclose(one, proc(S).denoiser_logits(model, xt, x0))  # not BD3-LM's mask
        cache = KVCache(len(model.blocks))
        for a in range(0, L, S):
            prefix = torch.cat([x0[:, :a], xt[:, a : a + S]], 1)
            alone = model(prefix, attn_mask=p.clean_causal_mask(prefix))[:, a:].float()
            stored = torch.ones(3, a, dtype=torch.bool)
            cached = model(xt[:, a : a + S], cache=cache, store=0,
                           attn_mask=p.clean_causal_mask(xt[:, a : a + S], stored)).float()
            model(x0[:, a : a + S], cache=cache, attn_mask=p.clean_causal_mask(x0[:, a : a + S], stored))
            for other in (alone, cached):
                other[..., p.never] = -math.inf
                torch.testing.assert_close(one[:, a : a + S], other, atol=1e-4, rtol=1e-4)


def test_block_size_L_is_mdlm():
    """One block: the bound is MDLM's, term for term, on the same noise (x_t never sees x0)."""
    L = 8
    model = net()
    x0 = torch.randint(0, 8, (4, L), generator=torch.Generator().manual_seed(1))
    b = batch(x0)
    with torch.no_grad():
        block = proc(L).bound_terms(model, b)
        mdlm = MaskedDiffusion(V, MASK, PAD, BOS).bound_terms(model, b)
    assert (block > 0).any()
    torch.testing.assert_close(block, mdlm, atol=1e-4, rtol=1e-4)


def test_block_size_1_is_autoregressive():
    """Block size 1: every nonzero term divided by its weight is −log p(xⁱ | x<ⁱ) computed directly, and the
    bound's expectation over the noise is the autoregressive NLL Σᵢ −log p(xⁱ | x<ⁱ)."""
    L = 6
    model, p = net(), proc(1)
    x0 = torch.randint(0, 8, (1, L), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        direct = []
        for i in range(L):
            inp = torch.cat([x0[:, :i], torch.full((1, 1), MASK)], 1)
            blk = torch.arange(i + 1)
            logits = model(inp, attn_mask=block_causal(blk, blk))[0, -1].float()
            logits[p.never] = -math.inf
            direct.append(-torch.log_softmax(logits, -1)[x0[0, i]])
        ar = torch.stack(direct).double()
        K = 4000
        b = batch(x0.expand(K, L).contiguous(), seed=3)
        b.u = torch.rand(K, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        t, w = p.times((b.u[:, None] + torch.arange(L) / L) % 1)  # block b's time: (u + b/n_blocks) mod 1
        terms = p.bound_terms(model, b).double()
    hit = terms > 0
    ratio = terms / w.expand(K, L)
    torch.testing.assert_close(ratio[hit], ar.expand(K, L)[hit], atol=1e-4, rtol=1e-4)
    est = terms.sum(-1)
    assert abs(float(est.mean()) - float(ar.sum())) < 4 * float(est.std()) / math.sqrt(K)


class ExactBlockDenoiser(nn.Module):
    """The exact denoiser of the toy distribution as a block model: a call on a prefix (n, e) sees only the
    prefix (later positions are unknown, i.e. masked) — what a block model learns."""

    def __init__(self, exact: nn.Module) -> None:
        super().__init__()
        self.exact = exact
        self.blocks = nn.ModuleList()  # no layers: the sampler's scratch KV cache stays empty (and unused)

    def forward(self, x, t=None, attn_mask=None, select=None, **kw):
        full = torch.full((x.shape[0], TOY_L), TOY_MASK, dtype=torch.long)
        full[:, : x.shape[1]] = x
        out = self.exact(full)[:, : x.shape[1]]
        return out if select is None else out[select]


def toy_proc(block_size: int) -> BlockDiffusion:
    return BlockDiffusion(TOY_V + 2, TOY_MASK, TOY_PAD, block_size=block_size)


@pytest.mark.parametrize("block_size,steps", [(1, 3), (2, 256), (3, 128)])
def test_block_sampler_matches_the_true_distribution(toy, block_size, steps):
    seqs, p, exact = toy
    pr = toy_proc(block_size)
    out = get_sampler("block", pr, cache=False)(ExactBlockDenoiser(exact), pr, Conditioning.unconditional(6000, TOY_L),
                                                 steps=steps, seed=1)
    assert chi2_gof(out.tokens, seqs, p) > 1e-3
    assert int(out.nfe.max()) <= steps  # a budget of `steps` over all blocks


@pytest.mark.parametrize("order", ["left-to-right", "confidence"])
def test_one_position_a_call_orders_match_the_true_distribution(toy, order):
    """Filling one position a call, in either order, draws every token from its exact conditional: the true
    distribution, in the block's S calls whatever the step budget."""
    seqs, p, exact = toy
    pr = toy_proc(3)
    out = get_sampler("block", pr, cache=False, order=order)(ExactBlockDenoiser(exact), pr,
                                                            Conditioning.unconditional(6000, TOY_L), steps=1, seed=1)
    assert chi2_gof(out.tokens, seqs, p) > 1e-3
    assert int(out.nfe.max()) == TOY_L


def test_left_to_right_order_on_a_clean_causal_model_is_its_left_to_right_decoder():
    """Two routes: greedy block sampling in order left-to-right on a shifted clean-causal model takes, at each
    position, the argmax of the prediction the masked family's left-to-right decoder reads there (the clean prefix,
    then [MASK]s), so ``difflm eval --left-to-right`` is the likelihood of what this order samples."""
    L, S = 10, 4
    model, p = net(shift=True), proc(S, "clean-causal")
    cond = Conditioning.unconditional(4, L, fill=MASK)
    cond.tokens[:, 0] = torch.tensor([1, 2, 3, 4])
    cond.fixed[:, 0] = True
    with torch.no_grad():
        x = get_sampler("block", p, order="left-to-right", greedy=True)(model, p, cond, steps=1, seed=0).tokens
        for i in range(1, L):
            xt = torch.cat([x[:, :i], torch.full((4, L - i), MASK)], 1)
            assert torch.equal(p.subs_logits(model, xt, None)[:, i].argmax(-1), x[:, i]), i
    with pytest.raises(DiffLMError, match="leave order at random"):
        get_sampler("block", p, order="confidence", threshold=0.9)


def test_one_step_per_block_of_two_is_detectably_wrong(toy):
    """Two tokens of a block drawn together in one step are independent given the prefix: the test sees it."""
    seqs, p, exact = toy
    pr = toy_proc(2)
    out = get_sampler("block", pr, cache=False)(ExactBlockDenoiser(exact), pr, Conditioning.unconditional(6000, TOY_L),
                                                 steps=1, seed=1)
    assert chi2_gof(out.tokens, seqs, p) < 1e-6


def prompt_cond(n: int, L: int, prompt_len: int) -> Conditioning:
    cond = Conditioning.unconditional(n, L, fill=MASK)
    cond.tokens[:, :prompt_len] = torch.arange(prompt_len) % 8
    cond.fixed[:, :prompt_len] = True
    return cond


@pytest.mark.parametrize("attention", ["full", "clean-causal"])
@pytest.mark.parametrize("prompt_len", [0, 3, 8])
def test_kv_cached_block_sampling_equals_uncached(prompt_len, attention):
    L, S = 14, 4  # a partial last block, and prompts ending inside / at the end of a block
    model, p = net(shift=attention == "clean-causal"), proc(S, attention)
    cond = prompt_cond(6, L, prompt_len)
    a = get_sampler("block", p, cache=True)(model, p, cond, steps=20, seed=7)  # 5 per block
    b = get_sampler("block", p, cache=False)(model, p, cond, steps=20, seed=7)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens[:, :prompt_len], cond.tokens[:, :prompt_len])
    assert not (a.tokens == MASK).any()
    assert (b.nfe <= a.nfe).all() and (a.nfe <= math.ceil(L / S) * 5).all()


def bf16_gemm_depends_on_row_count() -> bool:
    """Whether this CPU's bf16 matrix product rounds a row differently according to how many rows share the
    call (oneDNN picks its kernel by shape; seen on AMX Xeons, where 96 or 128 rows differ from 1 row at a time).
    No sampler can be exact across routes that batch rows differently there, short of 60× slower bf16."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(192, 768, generator=g), torch.randn(512, 768, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = torch.cat([F.linear(x[i:i + 1], w) for i in range(len(x))])
        return any(not torch.equal(F.linear(x[:m], w), one[:m]) for m in (32, 64, 96, 128, 256, 512))


def test_kv_cached_block_sampling_equals_uncached_in_bf16():
    """In bf16 the attention kernels round differently for different key counts; the static cache makes every
    row sum over L keys in both routes (a growing cache differed here in ~1% of tokens, half the rows)."""
    if bf16_gemm_depends_on_row_count():
        pytest.skip("this CPU's bf16 matmul rounds by row count (oneDNN kernel choice), so routes that batch rows "
                    "differently cannot agree to the token; the fp32 test above checks the routes' exactness")
    L, S, Vb = 64, 4, 600
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=Vb, max_len=L, n_layer=3, n_head=4, d_model=192))
    for q in model.parameters():
        q.data.normal_(0, 0.05)
    model.eval()
    p = BlockDiffusion(Vb, Vb - 4, Vb - 3, Vb - 2, block_size=S, eos_id=Vb - 1)
    cond = Conditioning.unconditional(8, L, fill=Vb - 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = get_sampler("block", p, cache=True)(model, p, cond, steps=64, seed=5)
        b = get_sampler("block", p, cache=False)(model, p, cond, steps=64, seed=5)
        c = torch.cat([get_sampler("block", p, cache=True)(model, p, cond.rows(slice(i, i + 3)), steps=64, seed=5,
                                                           rows=torch.arange(i, min(i + 3, 8))).tokens
                       for i in range(0, 8, 3)])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c)


def test_stop_at_eos_ends_rows_without_changing_what_came_before():
    L, S = 16, 4
    model, p = net(), proc(S)
    model.head.weight.data[EOS] += 0.4 * model.head.weight.data[3]  # make [EOS] common but not certain
    cond = prompt_cond(12, L, 2)
    full = get_sampler("block", p)(model, p, cond, steps=16, seed=2)
    stop = get_sampler("block", p, stop_at_eos=True)(model, p, cond, steps=16, seed=2)
    ended = 0
    for r in range(12):
        row, ref = stop.tokens[r].tolist(), full.tokens[r].tolist()
        gen = ref[2:]
        if EOS not in gen:
            assert row == ref and stop.nfe[r] == full.nfe[r]
            continue
        ended += 1
        end = 2 + gen.index(EOS)
        assert row[: end + 1] == ref[: end + 1]  # the same text up to its first [EOS]
        assert set(row[end + 1 :]) <= {PAD}
        last_block = end // S == math.ceil(L / S) - 1
        assert stop.nfe[r] == full.nfe[r] if last_block else stop.nfe[r] < full.nfe[r]  # no calls after its end
    assert 0 < ended < 12


def test_block_sampler_keeps_given_tokens_after_gaps_and_other_families_refuse_it():
    model, p = net(), proc(4)
    cond = Conditioning.unconditional(3, 12, fill=MASK)
    cond.fixed[:, 5] = True
    cond.tokens[:, 5] = 7
    out = get_sampler("block", p)(model, p, cond, steps=6, seed=3).tokens
    assert (out[:, 5] == 7).all() and not (out == MASK).any()
    assert torch.equal(get_sampler("block", p, cache=False)(model, p, cond, steps=6, seed=3).tokens, out)
    other = Conditioning(cond.tokens.clone(), cond.fixed.clone())
    other.tokens[:, 5] = 2
    moved = get_sampler("block", p)(model, p, other, steps=6, seed=3).tokens
    assert torch.equal(moved[:, :4], out[:, :4])  # the block before the given token never reads it
    with pytest.raises(DiffLMError, match="pad over the text after a gap"):
        get_sampler("block", p, stop_at_eos=True)(model, p, cond, steps=6)
    with pytest.raises(DiffLMError, match="does not fit a masked model"):
        get_sampler("block", MaskedDiffusion(V, MASK, PAD))
    with pytest.raises(DiffLMError, match="does not fit a block model"):
        get_sampler("ancestral", p)
    with pytest.raises(DiffLMError, match="multiple of process.block_size"):
        p.bound_terms(model, batch(torch.zeros(2, 10, dtype=torch.long)))


def markov_block_run(d, tmp_path, steps: int) -> DiffusionLM:
    """A block model (blocks of 4) of the Markov source, trained for ``steps`` steps into ``tmp_path / "bd3"``."""
    run = markov_run(d, {"type": "block", "block_size": 4}, batch_size=128, lr=2e-3, max_steps=steps)
    run.data.seq_len = 20  # 16 characters + [EOS] + padding, a multiple of the block size
    Trainer(run, tmp_path / "bd3", progress=False).fit()
    return DiffusionLM.from_pretrained(tmp_path / "bd3")


@pytest.mark.slow  # ~70 s on 2 cores; the default run keeps the CLI checks below on a briefly trained model
def test_known_distribution_bound_and_variable_length_samples(markov_corpus, tmp_path, capsys):
    """Trained on the Markov source of known entropy H: the bound is above H and close to it (closer than
    the masked model's at the same budget), and [EOS]-stopped samples have the source's length and bigrams."""
    d, P = markov_corpus
    H = markov.per_token_entropy(P, MARKOV_L)
    lm = markov_block_run(d, tmp_path, 600)
    r = evaluate(lm.model, lm.process, build_dataset(lm.run.data, lm.tokenizer, "valid"), n_samples=4, bf16=False)
    assert r.nelbo > H - max(3 * r.ci95, 0.005), (r.nelbo, H)
    assert r.nelbo - H < 0.1, (r.nelbo, H)
    g = lm.generate(300, steps=40, seed=0, sampler_options={"stop_at_eos": True})  # 8 per block
    assert sum(len(t) == MARKOV_L and set(t) <= set(markov.ALPHABET) for t in g.texts) >= 0.95 * 300
    assert (g.tokens[:, MARKOV_L + 1 :] == lm.tokenizer.pad_id).float().mean() > 0.95  # ended at the [EOS]
    assert markov.bigram_tv(g.texts, P) < 0.15
    cli_checks(tmp_path, capsys, trained=True)


def test_cli_cached_and_recomputed_prefixes_agree_and_infill_keeps_its_text(markov_corpus, tmp_path, capsys):
    """The CLI on a briefly trained block model (60 steps: its lines are not yet of the source's length)."""
    markov_block_run(markov_corpus[0], tmp_path, 60)
    cli_checks(tmp_path, capsys, trained=False)


def cli_checks(tmp_path, capsys, trained: bool) -> None:
    """The CLI: cached and recomputed prefixes give the same text (of the source's length when ``trained``); an
    infill keeps its text; a bad flag is one line."""
    import json

    from difflm.cli import main

    outs = []
    for extra in ([], ["--no-kv-cache"]):
        assert main(["sample", str(tmp_path / "bd3"), "--num", "4", "--steps", "20", "--stop-at-eos", "--json",
                     *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out)["samples"])
    assert outs[0] == outs[1] and (not trained or all(len(t) == MARKOV_L for t in outs[0]))
    assert main(["infill", str(tmp_path / "bd3"), "ab___cd", "--candidates", "4", "--json"]) == 0
    filled = json.loads(capsys.readouterr().out)["filled"]
    assert len(filled) == 1 and filled[0][:2] == "ab" and filled[0][-2:] == "cd" and len(filled[0]) == 8
    assert main(["infill", str(tmp_path / "bd3"), "ab___cd", "--stop-at-eos"]) == 2
    err = capsys.readouterr().err
    assert "pad over the text after a gap" in err and one_line_error(err)


def blockwise_argmax(model: Transformer, p: BlockDiffusion, n: int, L: int) -> torch.Tensor:
    """The second route: each block filled in one call, with its argmax tokens given the finished blocks before it
    (the whole prefix recomputed under the block-causal mask, no cache). (n, L) long."""
    x = torch.full((n, L), MASK)
    for a in range(0, L, p.block_size):
        e = min(a + p.block_size, L)
        blk = torch.arange(e) // p.block_size
        out = model(x[:, :e], attn_mask=block_causal(blk, blk)).float()
        out[..., p.never] = -float("inf")
        x[:, a:e] = out[:, a:e].argmax(-1)
    return x


@pytest.mark.parametrize("S", [1, 4])
def test_threshold_decoding_below_every_probability_fills_a_block_per_call_with_its_argmax(S):
    """τ below every probability: each block in one call, its argmax tokens (with blocks of 1: left-to-right
    argmax, autoregressive greedy decoding)."""
    L, model, p = 14, net(), proc(S)
    out = get_sampler("block", p, threshold=1e-9)(model, p, Conditioning.unconditional(3, L, fill=MASK), steps=1,
                                                  seed=0, temperature=5.0)
    assert torch.equal(out.tokens, blockwise_argmax(model, p, 3, L))
    assert (out.nfe == math.ceil(L / S)).all()


def test_threshold_one_unmasks_the_most_confident_position_per_call():
    L, S, model, p = 12, 4, net(), proc(4)
    seen = []
    out = get_sampler("block", p, threshold=1.0)(model, p, Conditioning.unconditional(2, L, fill=MASK), steps=1,
                                                 seed=0, on_step=lambda info: seen.append(info.tokens.clone()))
    assert (out.nfe == L).all()  # one token a call: S calls per block, whatever the step budget
    first = seen[0][:, :S] != MASK
    assert (first.sum(-1) == 1).all()
    blk = torch.arange(S) // S
    logp = model(torch.full((2, S), MASK), attn_mask=block_causal(blk, blk)).float()
    logp[..., p.never] = -float("inf")
    conf, tok = logp.softmax(-1).max(-1)
    assert torch.equal(first.float().argmax(-1), conf.argmax(-1))  # the most confident position first
    assert torch.equal(seen[0][:, :S][first], tok[first])  # with its argmax token


def test_threshold_decoding_ignores_the_step_budget_and_bench_sampling_runs_it_once():
    """With τ the step budget is unused: the same tokens and calls at any ``steps``, so ``bench-sampling`` runs that
    setting once (steps = length); BD3-LM's ancestral sampler does depend on it."""
    from difflm.evaluation.generative import step_free

    L, model, p = 12, net(), proc(4)
    model.head.weight.data *= 8
    cond = Conditioning.unconditional(3, L, fill=MASK)
    a, b = (get_sampler("block", p, threshold=0.5)(model, p, cond, steps=k, seed=0) for k in (3, 64))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.nfe, b.nfe)
    c, d = (get_sampler("block", p)(model, p, cond, steps=k, seed=0) for k in (3, 64))
    assert not torch.equal(c.nfe, d.nfe)
    assert step_free("block", "block", {"threshold": 0.9}) and not step_free("block", "block", {})
    assert not step_free("block", "block", {"cache": False})


def test_threshold_decoding_is_batch_invariant_and_the_kv_cache_exact():
    L, S, tau, model, p = 16, 4, 0.3, net(), proc(4)
    model.head.weight.data *= 8  # sharper: some calls unmask several positions, some one
    cond = prompt_cond(5, L, 3)
    cond.tokens[:, :3] = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 3, 5], [2, 4, 6]])
    a = get_sampler("block", p, threshold=tau)(model, p, cond, steps=1, seed=0)
    b = get_sampler("block", p, threshold=tau, cache=False)(model, p, cond, steps=1, seed=0)
    c = [get_sampler("block", p, threshold=tau)(model, p, cond.rows(slice(i, i + 2)), steps=1, seed=0,
                                                rows=torch.arange(i, min(i + 2, 5))) for i in range(0, 5, 2)]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.nfe, b.nfe)
    assert torch.equal(a.tokens, torch.cat([o.tokens for o in c])) and torch.equal(a.nfe, torch.cat([o.nfe for o in c]))
    assert not (a.tokens == MASK).any() and torch.equal(a.tokens[:, :3], cond.tokens[:, :3])
    # between one call per block that has free positions (4) and one per free token (13), and both seen
    assert math.ceil(L / S) <= int(a.nfe.min()) < int(a.nfe.max()) <= L - 3


def test_greedy_ancestral_block_sampling_takes_argmax_tokens():
    """greedy: the order of unmasking stays ancestral (random), the tokens are argmax: with one step per block the
    whole block is unmasked at once, so it equals the blockwise argmax."""
    L, model, p = 12, net(), proc(4)
    out = get_sampler("block", p, greedy=True)(model, p, Conditioning.unconditional(3, L, fill=MASK), steps=3, seed=4)
    assert torch.equal(out.tokens, blockwise_argmax(model, p, 3, L))
