"""AR→diffusion adaptation on the llama backbone: the shift by one position (a network that knows the next token
gets its masked targets right, in the masked and the block family), attention annealing (causal at step 0, the
family's own mask from the step the config names), the block sampler's cache agreeing with recomputation on a
shifted model, and a saved adapted model reloading to identical logits."""

from __future__ import annotations

import pytest
import torch

from difflm.components import build_components, read_model_folder, write_model_folder
from difflm.config import RunConfig
from difflm.data.tokenizers import train_char
from difflm.errors import DiffLMError
from difflm.models import Llama, LlamaConfig
from difflm.registry import BackboneNeeds

K = 12  # ordinary tokens of the toy: token a is followed by (a + 1) mod K
V = K + 4  # + [PAD] [MASK] [BOS] [EOS]
MASK = K + 1


def next_token_model(shift: bool, attention: str = "bidirectional") -> Llama:
    """A llama whose output at each position is the successor of that position's own token (attention and MLP
    write nothing): the AR view of the cyclic toy language, exactly."""
    cfg = LlamaConfig(n_layer=1, n_head=2, n_kv_head=2, d_model=V, d_ff=8, tie_embeddings=False, shift=shift)
    m = Llama(cfg.with_needs(BackboneNeeds(attention=attention), V, 64))
    with torch.no_grad():
        m.embed.weight.copy_(torch.eye(V))
        m.blocks[0].attn.o_proj.weight.zero_()
        m.blocks[0].down_proj.weight.zero_()
        succ = torch.zeros(V, V)
        for a in range(K):
            succ[(a + 1) % K, a] = 10.0
        m.head.weight.copy_(succ)
    return m.eval()


def cyclic(B: int, L: int, seed: int) -> torch.Tensor:
    start = torch.randint(0, K, (B, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(L)) % K


def process(family: str, **extra):
    from difflm.diffusion import build_process

    special = {"pad": K, "mask": MASK, "bos": K + 2, "eos": K + 3}
    cfg = RunConfig.from_dict({"process": {"type": family, **extra}}).process
    return build_process(cfg, vocab_size=V, special=special)


@pytest.mark.parametrize("shift", [True, False])
def test_shift_lets_a_next_token_model_fill_masked_targets(shift):
    """Masks whose left neighbour is visible: the shifted network reads the neighbour and is right everywhere;
    unshifted it predicts the successor of [MASK] and is wrong."""
    x0 = cyclic(4, 16, 0)
    xt = x0.clone()
    xt[:, 1::3] = MASK  # every masked position has a clean left neighbour
    p = process("masked")
    with torch.no_grad():
        logp = p.log_probs(next_token_model(shift), xt, None)
    pred = logp.argmax(-1)
    masked = xt == MASK
    assert torch.equal(pred[~masked], x0[~masked])  # carry-over
    assert (pred[masked] == x0[masked]).all().item() is shift


def test_shift_in_block_training_reads_the_clean_copy_at_block_starts():
    """Block diffusion's one-pass [x_t, x0] input: a block's first masked token is predicted from the clean x0
    copy of the token before it (where sampling finds it), the others from the previous x_t position."""
    p = process("block", block_size=4)
    x0 = cyclic(3, 16, 1)
    xt = x0.clone()
    xt[:, 4] = MASK  # first of block 1: its predecessor (3) is clean in x0, and in x_t
    xt[:, 8:10] = MASK  # first two of block 2: position 9's predecessor is masked in x_t
    xt[:, 7] = MASK  # the last of block 1, so x_t's position 7 differs from the clean copy
    with torch.no_grad():
        pred = p.denoiser_logits(next_token_model(True), xt, x0).argmax(-1)
    assert torch.equal(pred[:, [4, 7, 8]], x0[:, [4, 7, 8]])  # 8 reads the clean copy of 7 (masked in x_t)
    assert not torch.equal(pred[:, 9], x0[:, 9])  # its predecessor is masked in its own block
    assert torch.equal(p.preceding(8, None), torch.tensor([-1, 0, 1, 2, 11, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]))


def random_llama(shift: bool, anneal: int = 0, attention: str = "bidirectional", vocab: int = V) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, shift=shift, anneal_steps=anneal)
    m = Llama(cfg.with_needs(BackboneNeeds(attention=attention), vocab, 64))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_annealing_opens_attention_from_causal_to_full_at_the_named_step():
    N = 10
    m = random_llama(False, anneal=N).train()
    causal = random_llama(False, attention="causal").train()
    full = random_llama(False).train()
    x = torch.randint(0, K, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.set_step(0)
        assert torch.allclose(m(x), causal(x), atol=1e-6)
        m.set_step(N // 2)
        mask = m.annealed_mask(None, 24, None, "cpu")
        upper = torch.ones(24, 24, dtype=torch.bool).triu(1)
        frac = mask[upper].float().mean().item()
        assert 0.3 < frac < 0.7 and mask[~upper].all()  # half the future edges, all the past ones
        assert not torch.allclose(m(x), full(x), atol=1e-4) and not torch.allclose(m(x), causal(x), atol=1e-4)
        m.set_step(N - 1)
        assert m.open_fraction() < 1 and not torch.allclose(m(x), full(x), atol=1e-4)
        for s in (N, N + 5):
            m.set_step(s)
            assert m.open_fraction() == 1.0 and m.annealed_mask(None, 24, None, "cpu") is None
            assert torch.equal(m(x), full(x))
        m.set_step(3)
        assert torch.equal(m.eval()(x), full.eval()(x))  # inference always uses the family's mask
    # the block family's mask is intersected, never widened
    blk = torch.arange(8) // 4
    fam = blk[:, None] >= blk[None, :]
    m.train().set_step(N // 2)
    assert not (m.annealed_mask(fam, 8, None, "cpu") & ~fam).any()


def test_shift_and_annealing_are_refused_for_the_autoregressive_family():
    with pytest.raises(ValueError, match="already predicts the next token"):
        LlamaConfig(shift=True).with_needs(BackboneNeeds(attention="causal"), V, 64)


def test_block_sampler_cache_equals_recomputation_on_a_shifted_model():
    from difflm.sampling.block import BlockSampler
    from difflm.sampling.conditioning import Conditioning

    p = process("block", block_size=4)
    m = random_llama(True, attention="block-causal").eval()
    cond = Conditioning.unconditional(3, 16)
    outs = [BlockSampler(cache=c)(m, p, cond, steps=16, seed=5).tokens for c in (True, False)]
    assert torch.equal(outs[0], outs[1])


def test_a_saved_adapted_model_reloads_to_identical_logits(tmp_path):
    tok = train_char(["abcdefghij klmnopqrstuvwxyz"])
    run = RunConfig.from_dict({"model": {"type": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32,
                                         "d_ff": 40, "shift": True, "anneal_steps": 50},
                               "process": {"type": "block", "block_size": 4}, "data": {"seq_len": 16}})
    model, proc = build_components(run, tok)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.05 * torch.randn_like(q))
    write_model_folder(tmp_path / "m", model.eval(), tok, run, None)
    again, proc2, *_ = read_model_folder(tmp_path / "m")
    assert (again.cfg.shift, again.cfg.anneal_steps) == (True, 50)
    x = torch.randint(0, tok.vocab_size - 4, (2, 16))
    with torch.no_grad():
        a1 = proc.denoiser_logits(model, x, x)
        a2 = proc2.denoiser_logits(again.eval(), x, x)
        assert torch.equal(a1, a2)
        assert torch.equal(model(x), again(x))


def test_a_pretrained_start_needs_the_checkpoints_own_tokenizer(tmp_path):
    from difflm.components import check_pretrained_tokenizer

    (tmp_path / "ckpt").mkdir()
    run = RunConfig.from_dict({"model": {"type": "llama", "init": str(tmp_path / "ckpt")},
                               "tokenizer": {"type": "char"}})
    with pytest.raises(DiffLMError, match="needs the checkpoint's own tokenizer"):
        check_pretrained_tokenizer(run)
    run = RunConfig.from_dict({"model": {"type": "llama", "init": str(tmp_path / "ckpt")},
                               "tokenizer": {"type": "hf", "path": str(tmp_path / "ckpt")}})
    check_pretrained_tokenizer(run)


@pytest.mark.parametrize("family, samplers", [
    ("masked", ["ancestral", "cached", "first-hitting", "remdm", "confidence", "threshold"]),
    ("block", ["block"]),
    ("block-cc", ["block"]),  # attention clean-causal: no annealing
])
def test_every_sampler_infill_and_eval_run_on_an_adapted_model(tmp_path, family, samplers):
    import math

    from difflm.pipeline import DiffusionLM

    tok = train_char(["abcdefghij klmnopqrstuvwxyz"])
    cc = family.endswith("-cc")
    family = family.removesuffix("-cc")
    proc = {"type": family, **({"block_size": 4} if family == "block" else {}),
            **({"attention": "clean-causal"} if cc else {})}
    run = RunConfig.from_dict({"model": {"type": "llama", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_model": 16,
                                         "d_ff": 24, "shift": True, "anneal_steps": 0 if cc else 10},
                               "process": proc, "data": {"corpus": "text", "path": str(tmp_path / "t.txt"),
                                                         "seq_len": 16}})
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    model, _ = build_components(run, tok)
    write_model_folder(tmp_path / "m", model.eval(), tok, run, None)
    lm = DiffusionLM.from_pretrained(tmp_path / "m")
    for s in samplers:
        g = lm.generate(2, 16, steps=8, sampler=s, seed=1)
        assert not (g.tokens == tok.mask_id).any()
        assert torch.equal(lm.generate(2, 16, steps=8, sampler=s, seed=1, batch_size=1).tokens, g.tokens)
    assert math.isfinite(lm.evaluate("valid", samples=1, max_batches=1).nelbo)
    filled = lm.infill("the ___ fox", span_tokens=3, candidates=2)[0]
    assert filled.startswith("the ") and filled.endswith(" fox")
    if family == "block":
        assert lm.generate(1, 16, prompt="the quick", steps=8).texts[0].startswith("the quick")


def test_clean_causal_mask_by_hand():
    p = process("masked", attention="clean-causal")
    xt = torch.tensor([[3, MASK, 5, MASK]])
    want = torch.tensor([[1, 0, 0, 0],   # clean 0 reads itself
                         [1, 1, 0, 0],   # [MASK] 1 reads clean 0 and itself
                         [1, 0, 1, 0],   # clean 2 reads clean 0 and itself, never the [MASK] at 1
                         [1, 0, 1, 1]],  # [MASK] 3 reads the clean positions before it and itself
                        dtype=torch.bool)
    assert torch.equal(p.clean_causal_mask(xt)[0, 0], want)
    # clean-causal-masks: a [MASK] also reads the [MASK]s before it (3 reads 1); the clean rows stay as they were
    want[3, 1] = True
    assert torch.equal(process("masked", attention="clean-causal-masks").clean_causal_mask(xt)[0, 0], want)


@pytest.mark.parametrize("backbone", ["transformer", "llama"])
@pytest.mark.parametrize("attention", ["clean-causal", "clean-causal-masks", "full"])
def test_clean_causal_attention_starts_a_shifted_adaptation_exactly_at_its_ar_parent(attention, backbone):
    """A causal (AR) network and the same weights as a shifted bidirectional masked denoiser: on a clean prefix
    followed by [MASK]s, clean-causal attention predicts the first [MASK] as the parent predicts the next token
    (and reads the prefix as it does); full attention lets the prefix read the [MASK]s, and the prediction moves.
    On the llama backbone this is SmolLM2's adaptation (``smollm2-135m-mdlm-cc-ptb``) at its first step."""
    from difflm.models import Transformer, TransformerConfig

    torch.manual_seed(0)
    if backbone == "llama":
        parent = random_llama(False, attention="causal")
        child = random_llama(True)
    else:
        cfg = TransformerConfig(n_layer=2, n_head=2, d_model=32)
        parent = Transformer(cfg.with_needs(BackboneNeeds(attention="causal"), V, 64))
        with torch.no_grad():
            for q in parent.parameters():
                q.add_(0.1 * torch.randn_like(q))
        child = Transformer(TransformerConfig(n_layer=2, n_head=2, d_model=32, shift=True).with_needs(
            BackboneNeeds(attention="bidirectional"), V, 64))
    child.load_state_dict(parent.state_dict())
    parent.eval(), child.eval()
    p = process("masked", attention=attention)
    x0 = cyclic(3, 12, 2)
    xt = torch.cat([x0[:, :5], torch.full((3, 7), MASK)], 1)  # a clean prefix of 5, then [MASK]s
    with torch.no_grad():
        want = torch.log_softmax(parent(x0[:, :5])[:, 4].float(), -1)  # the parent's next token after the prefix
        got = p.log_probs(child, xt, None)[:, 5]
    finite = torch.isfinite(got[0])  # the SUBS log-probs put -inf on [MASK] and [PAD]
    same = torch.allclose(torch.log_softmax(want[:, finite], -1), got[:, finite], atol=1e-5)
    assert same == (attention != "full")


@pytest.mark.parametrize("attention", ["clean-causal", "full"])
@pytest.mark.parametrize("k", [0, 2])
def test_block_clean_causal_attention_starts_a_shifted_adaptation_exactly_at_its_ar_parent(attention, k):
    """The block family the same way (``smollm2-135m-bd3lm-cc-ptb`` at its first step): with the clean block before
    it and the first k positions of its own block clean, the first [MASK] of a block is predicted as the causal
    parent predicts the next token. BD3-LM's own mask reads the clean block bidirectionally (and the noisy block
    too), so its prediction moves."""
    torch.manual_seed(0)
    parent = random_llama(False, attention="causal").eval()
    child = random_llama(True, attention="block-causal").eval()
    child.load_state_dict(parent.state_dict())
    p = process("block", block_size=4, attention=attention)
    x0 = cyclic(3, 12, 2)
    x0[:, 6] = (x0[:, 6] + 5) % K  # not the toy's rule: the parent has to read the row
    xt = x0.clone()
    xt[:, 4 + k:] = MASK
    with torch.no_grad():
        want = torch.log_softmax(parent(x0[:, :4 + k])[:, -1].float(), -1)
        got = torch.log_softmax(p.denoiser_logits(child, xt, x0)[:, 4 + k], -1)
    finite = torch.isfinite(got[0])
    same = torch.allclose(torch.log_softmax(want[:, finite], -1), got[:, finite], atol=1e-5)
    assert same == (attention == "clean-causal")


def test_a_kv_cache_under_clean_causal_attention_is_a_one_line_error():
    from difflm.models.transformer import KVCache

    p = process("masked", attention="clean-causal")
    with pytest.raises(DiffLMError, match="decode with --kv-cache causal"):
        p.subs_logits(random_llama(True), torch.full((1, 4), MASK), None, cache=KVCache(2))


def test_left_to_right_nll_is_the_likelihood_of_decoding_one_token_a_call():
    """Two routes to the same number for a clean-causal shifted llama: the log-probability of each token as the
    left-to-right decoder meets it (the clean prefix, then all [MASK]s, read at the first [MASK]), one call per
    token, against ``left_to_right_terms``' single teacher-forced pass (plus a [MASK] for the first token)."""
    from difflm.data.datasets import make_batch

    p = process("masked", attention="clean-causal")
    m = random_llama(True).eval()
    x0 = torch.randint(0, K, (3, 9), generator=torch.Generator().manual_seed(4))
    batch = make_batch(x0, K, K + 3, "packed")
    with torch.no_grad():
        got = p.left_to_right_terms(m, batch)
        want = torch.zeros_like(got)
        for i in range(x0.shape[1]):
            xt = torch.cat([x0[:, :i], torch.full((3, x0.shape[1] - i), MASK)], 1)
            want[:, i] = -p.log_probs(m, xt, None)[:, i].gather(-1, x0[:, i : i + 1])[:, 0]
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(p.left_to_right_nll(m, batch), want.double().sum(-1), atol=1e-4)
    for other, net in ((process("masked"), m), (p, random_llama(False)),  # unshifted: a clean token reads itself
                       (process("masked", attention="clean-causal", time_conditioning=True), m)):
        with pytest.raises(DiffLMError, match="exact only for a time-free masked or block model"):
            other.left_to_right_terms(net, batch)


def test_clean_targets_never_score_a_clean_first_position():
    """A shifted network reads the first position's prediction off that position's own state (nothing is before
    it), so under clean-causal attention a clean first token sees itself; process.clean_targets scores it only
    when it is [MASK]. Every other clean position is scored, blind to its own token."""
    from difflm.data.datasets import make_batch

    p = process("masked", attention="clean-causal", loss="cmlm", clean_targets=True)
    m = random_llama(True).eval()
    x0 = torch.randint(0, K, (64, 10), generator=torch.Generator().manual_seed(5))
    batch = make_batch(x0, K, K + 3, "packed")
    batch.rows, batch.seed, batch.step = torch.arange(64), 0, 1
    batch.u = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        terms = p.loss(m, batch)
        xt = p.corrupt(batch, p.times(batch.u)[0])
        own = x0.clone()
        own[:, 0] = (x0[:, 0] + 1) % K
        moved = p.subs_logits(m, own, None)[:, 0] - p.subs_logits(m, x0, None)[:, 0]
    first_clean = xt[:, 0] != MASK
    assert first_clean.any() and (~first_clean).any()
    assert torch.all(terms[first_clean, 0] == 0) and torch.all(terms[~first_clean, 0] > 0)
    assert torch.all(terms[:, 1:] > 0)  # every later position, clean or masked
    assert moved[:, :K].abs().max() > 1e-3  # a clean first position's prediction reads its own token


def test_block_clean_targets_add_the_clean_streams_next_token_terms():
    """Two routes to the same terms: the block family's loss with process.clean_targets is its loss without (the same
    draws) plus, at every position but the first, the exact −log p(x0ʲ | x0^{<j}) that left-to-right decoding
    meets (``left_to_right_terms``, its own pass over the clean row); the first position gets no next-token term."""
    from difflm.data.datasets import make_batch

    plain = process("block", block_size=4, attention="clean-causal")
    ct = process("block", block_size=4, attention="clean-causal", clean_targets=True)
    m = random_llama(True, attention="block-causal").eval()
    x0 = torch.randint(0, K, (6, 12), generator=torch.Generator().manual_seed(7))
    batch = make_batch(x0, K, K + 3, "packed")
    batch.rows, batch.seed, batch.step = torch.arange(6), 0, 1
    batch.u = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a, b, l2r = plain.loss(m, batch), ct.loss(m, batch), plain.left_to_right_terms(m, batch)
    assert (a == 0).any() and (a > 0).any()  # both clean and masked positions in the draw
    assert torch.equal(b[:, 0], a[:, 0])
    assert torch.all(l2r[:, 1:] > 0)
    assert torch.allclose(b[:, 1:], a[:, 1:] + l2r[:, 1:], atol=1e-5)
    with pytest.raises(DiffLMError, match="needs process.attention: clean-causal"):
        process("block", block_size=4, clean_targets=True)


def test_a_block_model_with_clean_targets_trains_and_needs_the_shift(tmp_path):
    """``smollm2-135m-bd3lm-cc-ptb``'s loss through the trainer on a tiny llama: it falls over a few steps; unshifted,
    an x0 position would predict its own token, so the config is refused in one line."""
    from difflm.training.trainer import Trainer

    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 64)
    cfg = {"model": {"type": "llama", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_model": 32, "d_ff": 48,
                     "shift": True},
           "process": {"type": "block", "block_size": 4, "attention": "clean-causal", "clean_targets": True},
           "data": {"corpus": "text", "path": str(tmp_path / "t.txt"), "seq_len": 16}, "tokenizer": {"type": "char"},
           "train": {"batch_size": 8, "max_steps": 30, "lr": 1e-2, "warmup_steps": 2, "eval_every": 10**6,
                     "save_every": 10**6, "log_every": 1, "tensorboard": False, "bf16": False}}
    Trainer(RunConfig.from_dict(cfg), tmp_path / "run", progress=False).fit()
    losses = [float(r.split(",")[2]) for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
              if r.split(",")[2]]
    assert len(losses) >= 20 and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    cfg["model"]["shift"] = False
    with pytest.raises(DiffLMError, match="clean_targets needs model.shift"):
        build_components(RunConfig.from_dict(cfg), train_char(["the quick brown fox jumps over the lazy dog"]))


def tiny_clean_causal_lm(tmp_path, family: str):
    """An untrained SmolLM2-shaped clean-causal model (shifted, time-free) on a character tokenizer, as a folder."""
    from difflm.pipeline import DiffusionLM

    tok = train_char(["abcdefghij klmnopqrstuvwxyz"])
    proc = {"type": family, "attention": "clean-causal", **({"block_size": 4} if family == "block" else {})}
    run = RunConfig.from_dict({"model": {"type": "llama", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_model": 16,
                                         "d_ff": 24, "shift": True, "anneal_steps": 0},
                               "process": proc, "data": {"corpus": "text", "path": str(tmp_path / "t.txt"),
                                                         "seq_len": 16}})
    torch.manual_seed(3)
    model, _ = build_components(run, tok)
    write_model_folder(tmp_path / family, model.eval(), tok, run, None)
    return DiffusionLM.from_pretrained(tmp_path / family), tok


def test_text_nats_of_a_clean_causal_model_is_its_left_to_right_likelihood_by_hand(tmp_path):
    import torch.nn.functional as F

    lm, tok = tiny_clean_causal_lm(tmp_path, "masked")
    ids = tok.encode("the fox")
    x = [*ids, tok.eos_id]  # a packed model scores the text and its [EOS]
    want = 0.0
    with torch.no_grad():
        for i in range(len(x)):  # fill position i with the positions before it clean and the rest [MASK]
            row = torch.tensor([x[:i] + [tok.mask_id] * (len(x) - i)])
            logits = lm.process.subs_logits(lm.model, row, None)[0, i]
            want -= float(F.log_softmax(logits.double(), -1)[x[i]])
    got = lm.text_nats([ids])
    assert got.shape == (1,) and got.dtype == torch.float64
    assert abs(float(got[0]) - want) < 1e-4 * len(x)


@pytest.mark.parametrize("family", ["masked", "block"])
def test_infill_candidates_keep_the_most_likely_whole_text(tmp_path, family):
    """Version i of an infill with c candidates is the likeliest (``text_nats``, exact left to right here) of
    the fills in rows i·c … i·c + c − 1, which are what ``num`` = versions × c draws without ranking."""
    import math

    lm, tok = tiny_clean_causal_lm(tmp_path, family)
    text = "a ___ fox[MASK]s"  # 12 tokens + [EOS]: not whole blocks of 4 when scored
    c = 3
    kept = lm.infill(text, span_tokens=4, num=2, candidates=c, seed=4, steps=8)
    drawn = lm.infill(text, span_tokens=4, num=2 * c, seed=4, steps=8)
    nats = lm.text_nats([lm.encode_text(t) for t in drawn]).view(2, c)
    assert len(set(drawn)) > 2  # the ranking has something to choose between
    assert kept == [drawn[i * c + int(nats[i].argmin())] for i in range(2)]
    assert all(math.isfinite(s["nats"]) for s in lm.score(["the fox", "a"]))  # block rows topped up with [MASK]s
