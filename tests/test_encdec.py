"""Encoder-decoder seq2seq (issue 24): the encoder reads only the source, cross-attention ignores source padding,
the decoder reads the source only through the encoder and numbers the target from 0, cached autoregressive
decoding equals the full pass, and encoder-decoder models train, sample, score and reload like any model."""

import pytest
import torch
from conftest import one_line_error
from test_seq2seq import SRC_LEN, pairs_run, write_pairs

from difflm import registry
from difflm.components import build_components
from difflm.config import RunConfig
from difflm.data.corpora import load_pairs
from difflm.data.datasets import source_mask
from difflm.data.tokenizers import train_char
from difflm.errors import DiffLMError
from difflm.models.seq2seq import SourceReader, bind_source
from difflm.models.transformer import KVCache
from difflm.pipeline import DiffusionLM

FAMILIES = ("masked", "autoregressive", "gaussian", "sedd", "uniform", "d3pm", "block")


def random_net(model: dict, process: dict, seq_len: int = 16, seed: int = 0, train: dict | None = None):
    """A randomly initialised network (weights jittered so its outputs are far from uniform) on a character
    tokenizer: (tokenizer, network in eval mode, process, run config)."""
    tok = train_char(["abcdefgh ijklmnop"])
    run = RunConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, **model}, "process": process,
                               "data": {"corpus": "pairs", "seq_len": seq_len}, "train": train or {}})
    torch.manual_seed(seed)
    net, proc = build_components(run, tok)
    with torch.no_grad():
        for q in net.parameters():
            q.add_(0.3 * torch.randn_like(q))
    return tok, net.eval(), proc, run


def tiny(family: str, seed: int = 0, absolute: bool = False, **model):
    tok, model, process, _ = random_net({"encoder_layers": 1, "absolute_positions": absolute, **model},
                                        {"type": family}, seed=seed)
    return tok, model, process


def rows(tok, pairs: list[tuple[str, str]], L: int = 16) -> torch.Tensor:
    out = []
    for s, t in pairs:
        ids = tok.encode(s) + [tok.bos_id] + tok.encode(t)
        out.append(ids + [tok.eos_id] * (L - len(ids)))
    return torch.tensor(out)


def test_the_encoder_never_sees_a_target_token_and_ignores_source_padding():
    tok, model, process = tiny("masked")
    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg")])
    r = SourceReader.for_rows(model, x, tok.bos_id)
    assert r.mask.sum(-1).tolist() == [4, 2] and r.start.tolist() == [4, 2]
    y = x.clone()
    y[:, 6:9] = torch.tensor(tok.encode("ijk"))  # target tokens only (and row 2's source padding)
    ry = SourceReader.for_rows(model, y, tok.bos_id)
    a, b = r.memory(), ry.memory()
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.states[a.mask], b.states[b.mask], atol=1e-6)  # the real source positions: unchanged
    z = x.clone()
    z[1, 0] = tok.encode("h")[0]  # a source token does change them
    assert not torch.allclose(SourceReader.for_rows(model, z, tok.bos_id).memory().states[1, :2], a.states[1, :2])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_decoder_reads_the_source_only_through_the_encoder(family):
    """With the encoded source held fixed, the source tokens in the decoder's row change nothing at the target;
    a different source (through the encoder) does."""
    tok, model, process = tiny(family)
    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg")])
    x2 = x.clone()
    x2[0, :4] = torch.tensor(tok.encode("hhhh"))
    x2[1, :2] = torch.tensor(tok.encode("hh"))
    tgt = ~source_mask(x, tok.bos_id)
    r = bind_source(model, process, x)
    with torch.no_grad():
        t = torch.full((2,), 0.5)
        inp = (lambda v: model.embed(v)) if family == "gaussian" else (lambda v: v)
        a, b = r(inp(x), t), r(inp(x2), t)
        c = bind_source(model, process, x2)(inp(x2), t)
    assert torch.allclose(a[tgt], b[tgt], atol=1e-5)
    assert not torch.allclose(a[tgt], c[tgt], atol=1e-3)


def test_block_diffusion_one_pass_equals_block_by_block_and_kv_cached_reading_the_source():
    """BD3-LM's training input [x_t, x0] under its block mask, composed with the decoder's view of the target: at
    every target position the loss's logits are those of each block seen alone after its clean prefix, recomputed
    or read from the KV cache, all reading the same encoded source."""
    from difflm.diffusion.block import block_causal

    tok, model, process = tiny("block")
    S = process.block_size = 4
    x0 = rows(tok, [("abcd", "efgh"), ("ab", "cdefg"), ("abcdef", "gh")])
    tgt = ~source_mask(x0, tok.bos_id)
    g = torch.Generator().manual_seed(0)
    xt = torch.where(tgt & (torch.rand(x0.shape, generator=g) < 0.5), torch.full_like(x0, tok.mask_id), x0)
    r = bind_source(model, process, x0)
    L = x0.shape[1]
    with torch.no_grad():
        one = process.denoiser_logits(r, xt, x0)
        cache = KVCache(len(model.blocks))
        for a in range(0, L, S):
            blk = torch.arange(a + S) // S
            alone = r(torch.cat([x0[:, :a], xt[:, a:a + S]], 1), attn_mask=block_causal(blk, blk))[:, a:].float()
            cached = r(xt[:, a:a + S], cache=cache, store=0).float()
            r(x0[:, a:a + S], cache=cache)  # commit the clean block
            for other in (alone, cached):
                other[..., process.never] = -float("inf")
                m = tgt[:, a:a + S]
                torch.testing.assert_close(one[:, a:a + S][m], other[m], atol=1e-4, rtol=1e-4)
    x2 = x0.clone()
    x2[0, :4] = torch.tensor(tok.encode("hhhh"))  # another source: the loss's logits change
    with torch.no_grad():
        other = process.denoiser_logits(bind_source(model, process, x2), xt, x0)
    assert not torch.allclose(one[0][tgt[0]], other[0][tgt[0]], atol=1e-3)


def test_block_encoder_decoder_translates_batch_invariantly_with_or_without_the_kv_cache():
    tok, model, process = tiny("block")
    run = RunConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "encoder_layers": 1},
                               "process": {"type": "block", "block_size": 4},
                               "data": {"corpus": "pairs", "seq_len": 16}})
    process.block_size = 4
    lm = DiffusionLM(model, process, tok, run, device="cpu")
    srcs = ["abcd", "ab", "abcdefg"]
    kw = {"sampler": "block", "steps": 8, "seed": 1, "bf16": False}
    one = [o.prediction for o in lm.generate_targets(srcs, batch_size=1, **kw)]
    assert one == [o.prediction for o in lm.generate_targets(srcs, batch_size=3, **kw)]
    assert one == [o.prediction for o in lm.generate_targets(srcs, batch_size=3, sampler_options={"cache": False},
                                                             **kw)]
    assert all(o.nfe > 0 for o in lm.generate_targets(srcs, **kw))


@pytest.mark.parametrize("sampler", [c.name for c in registry.samplers("masked") if c.fits(tiny("masked")[2])])
def test_every_masked_sampler_translates_batch_invariantly(sampler):
    """Rows finish at different calls; a sampler that calls the network on the rows still running must hand it
    those rows' sources (confidence and first-hitting once read the whole batch's and crashed)."""
    tok, model, process = tiny("masked")
    run = RunConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "encoder_layers": 1},
                               "process": {"type": "masked"}, "data": {"corpus": "pairs", "seq_len": 16}})
    lm = DiffusionLM(model, process, tok, run, device="cpu")
    srcs = ["abcd", "ab", "abcdefg"]
    kw = {"sampler": sampler, "steps": 8, "seed": 2, "bf16": False}
    if sampler in ("confidence", "threshold"):
        kw["sampler_options"] = {"block": 3}
    one = [(o.prediction, o.nfe) for o in lm.generate_targets(srcs, batch_size=1, **kw)]
    assert one == [(o.prediction, o.nfe) for o in lm.generate_targets(srcs, batch_size=3, **kw)]


def test_a_masked_model_starts_from_its_source_as_the_draft():
    """draft_from="source" (a revision task): the target region starts as the source. Mask-Predict from iteration 9
    of 10 re-masks ⌊N/10⌋ of the N ≤ 9 free positions, none: the source comes back unchanged, in 2 calls."""
    tok, model, process = tiny("masked")
    run = RunConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "encoder_layers": 1},
                               "process": {"type": "masked"}, "data": {"corpus": "pairs", "seq_len": 16}})
    lm = DiffusionLM(model, process, tok, run, device="cpu")
    srcs = ["abcdefg", "abc dfe"]
    outs = lm.generate_targets(srcs, draft_from="source", steps=10, sampler_options={"start": 9}, bf16=False)
    assert [o.prediction for o in outs] == srcs and all(o.nfe == 2 for o in outs)
    with pytest.raises(DiffLMError, match="'source'"):
        lm.generate_targets(srcs, draft_from="copy")


def test_targets_are_numbered_from_zero_whatever_the_source_length():
    """The same target region (12 positions) after sources of 2 and 4 tokens, reading the same encoded source, gets
    the same decoder output: the decoder sees the target at positions 0, 1, … wherever the row puts it."""
    tok, model, process = tiny("masked")
    short, long_ = rows(tok, [("ab", "cdef")], L=14), rows(tok, [("abab", "cdef")], L=16)
    mem = bind_source(model, process, short).memory()
    t = torch.full((1,), 0.5)
    with torch.no_grad():
        a = model(short, t, memory=mem)
        b = model(long_, t, memory=type(mem)(mem.states, mem.mask, mem.start + 2))
    assert torch.allclose(a[0, 2:], b[0, 4:], atol=1e-5)


@pytest.mark.parametrize("absolute,copy", [(False, False), (True, False), (False, True)])
def test_cached_autoregressive_decoding_equals_the_full_pass(absolute, copy):
    tok, model, process = tiny("autoregressive", absolute=absolute, copy_source=copy)
    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg")])
    r = bind_source(model, process, x)
    inp = process.shift_right(x)
    with torch.no_grad():
        full = r(inp)
        cache = KVCache(len(model.blocks))
        parts = [r(inp[:, :3], cache=cache)] + [r(inp[:, i : i + 1], cache=cache) for i in range(3, 16)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_uniform_copy_puts_the_aligned_source_embedding_into_the_decoder_input():
    """model.copy_source (Gu et al. 2018's uniform copy): target position j reads source position
    min(⌊j·r⌋, n−1): the first block's input changes at the target positions aligned to a changed source token and
    nowhere else, and with cross-attention silenced the decoder's output still depends on the source; without the
    copy it does not depend on it at all."""
    x = None
    for copy in (True, False):
        tok, model, process = tiny("masked", copy_source=copy, copy_ratio=0.5)
        if x is None:
            x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg")])
            x[:, 5:] = process.mask_id  # the target all [MASK] after its [BOS]
        with torch.no_grad():
            for blk in model.blocks:
                blk.cross.proj.weight.zero_()
        r = bind_source(model, process, x)
        mem = r.memory()
        if copy:
            pos = torch.arange(12)[None].expand(2, -1)
            want = torch.stack([torch.stack([mem.embedded[b, min(j // 2, n - 1)] for j in range(12)])
                                for b, n in enumerate([4, 2])])
            assert torch.equal(mem.uniform_copy(pos, 0.5), want)
            assert torch.equal(mem.embedded[:, :2], model.embed(x[:, :2]))  # the input embeddings, not the states
        x2 = x.clone()
        x2[0, 3] = tok.encode("h")[0]  # row 0's last source token: target positions j ≥ 6 read it (⌊j/2⌋ ≥ 3)
        inputs = []
        hook = model.blocks[0].register_forward_pre_hook(lambda m, args, seen=inputs: seen.append(args[0]))
        with torch.no_grad():
            a = r(x, torch.full((2,), 0.5))
            b = bind_source(model, process, x2)(x2, torch.full((2,), 0.5))
        hook.remove()
        changed = (inputs[0] - inputs[1]).abs().amax(-1)[0, 4:] > 0  # row 0's target, from its [BOS] (j = 0) on
        assert changed.tolist() == ([False] * 6 + [True] * 6 if copy else [False] * 12)
        assert torch.equal(inputs[0][1], inputs[1][1])
        assert torch.allclose(a[0, 4:], b[0, 4:], atol=1e-5) != copy  # the output, through self-attention too


def test_copy_source_needs_an_encoder_and_a_text_source():
    with pytest.raises(DiffLMError, match="model.copy_source .* set model.encoder_layers"):
        random_net({"copy_source": True}, {"type": "masked"})
    run = RunConfig.from_dict({"model": {"n_layer": 1, "n_head": 2, "d_model": 32, "encoder_layers": 1,
                                         "copy_source": True}, "data": {"corpus": "scenes", "seq_len": 16}})
    with pytest.raises(DiffLMError, match="an image has none"):
        build_components(run, train_char(["abc"]))


@pytest.mark.parametrize("seed", [8, 9])  # random models whose greedy choice is not the best: one ends at [EOS]
def test_beam_search_finds_the_best_translation_that_exhaustive_search_finds(seed):
    """With k at least the number of hypotheses, beam search is exhaustive: it must return, for every row, the
    target of highest log-probability per token among all targets the row has room for (scored by full passes)."""
    import itertools

    from difflm.sampling import get_sampler
    from difflm.sampling.conditioning import Conditioning

    tok = train_char(["ab"])
    run = RunConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "encoder_layers": 1},
                               "process": {"type": "autoregressive"}, "data": {"corpus": "pairs", "seq_len": 7}})
    torch.manual_seed(seed)
    model, process = build_components(run, tok)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.5 * torch.randn_like(q))
    model.eval()
    sources, L = ["ab", "ba", "aa"], 7
    allowed = [v for v in range(tok.vocab_size) if v not in process.never]
    room = L - 3
    cond = Conditioning(torch.tensor([tok.encode(s) + [tok.bos_id] + [tok.mask_id] * room for s in sources]),
                        torch.tensor([[True] * 3 + [False] * room] * len(sources)))
    net = bind_source(model, process, cond.tokens)
    k = len(allowed) ** room
    with torch.no_grad():
        beam = get_sampler("autoregressive", process, beam=k)(net, process, cond, seed=0).tokens
        greedy = get_sampler("autoregressive", process, greedy=True)(net, process, cond, seed=0).tokens
        by_passes = cond.tokens.clone()  # greedy decoding by one full pass per position, a second route
        for i in range(3, L):
            by_passes[:, i] = process.log_probs(bind_source(model, process, by_passes), by_passes)[:, i].argmax(-1)
    assert torch.equal(greedy, by_passes)
    for b, src in enumerate(sources):
        hyps = set()
        for y in itertools.product(allowed, repeat=room):
            y = list(y)
            hyps.add(tuple(y[: y.index(tok.eos_id) + 1] if tok.eos_id in y else y))
        best, best_score = None, float("-inf")
        for y in hyps:
            row = torch.tensor([tok.encode(src) + [tok.bos_id] + list(y) + [tok.eos_id] * (room - len(y))])
            with torch.no_grad():
                lp = process.log_probs(bind_source(model, process, row), row)[0]
            score = float(sum(lp[3 + j, y[j]] for j in range(len(y)))) / len(y)
            if score > best_score:
                best, best_score = y, score
        got = beam[b, 3:].tolist()
        assert tuple(got[: got.index(tok.eos_id) + 1] if tok.eos_id in got else got) == best, src
        assert all(v == tok.eos_id for v in got[len(best):])  # the rest of the row is [EOS] fill
    assert not torch.equal(beam, greedy)  # this random model's greedy choice is not the best (else vacuous)


def test_encoder_layers_need_pairs_and_a_family_that_supports_them():
    tok = train_char(["abc"])
    with pytest.raises(DiffLMError, match="needs data.corpus pairs"):
        build_components(RunConfig.from_dict({"model": {"encoder_layers": 1}, "data": {"mode": "lines"}}), tok)
    with pytest.raises(DiffLMError, match="not supported by the editflow family"):
        build_components(RunConfig.from_dict({"model": {"encoder_layers": 1}, "process": {"type": "editflow"},
                                              "data": {"corpus": "pairs"}}), tok)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    from difflm.training.trainer import Trainer

    out = {}
    # the masked model copies (1,000 steps would teach it reversal too; copying keeps the default test run short)
    for task, family, steps in (("copy", "masked", 250), ("reverse", "autoregressive", 300)):
        d = tmp_path_factory.mktemp(f"encdec-{task}-{family}")
        write_pairs(d, task)
        run = pairs_run(d, {"type": family}, max_steps=steps)
        run = RunConfig.from_dict({**run.to_dict(), "model": {"n_layer": 2, "n_head": 2, "d_model": 64,
                                                              "encoder_layers": 2}})
        Trainer(run, d / "run", progress=False).fit()
        out[family] = (d, DiffusionLM.from_pretrained(d / "run", device="cpu"))
    return out


@pytest.mark.parametrize("family", ["masked", "autoregressive"])
@pytest.mark.slow  # trains small encoder-decoders (about 40 s together): make test-slow
def test_encoder_decoder_models_learn_to_read_their_source_and_reload(learned, family):
    """Through the encoder only, the masked model learns to copy and the AR model to reverse (the target's position
    j finds the source's S−1−j); both are saved and reloaded by from_pretrained, and score, sample and batch like
    any model."""
    d, lm = learned[family]
    pairs = load_pairs(lm.run.data, "test")
    outs = lm.generate_targets([s for s, _ in pairs], steps=16, seed=0, bf16=False)
    exact = sum(o.prediction == t for o, (_, t) in zip(outs, pairs)) / len(pairs)
    assert exact >= 0.95, (family, exact, [(o.source, o.prediction) for o in outs[:3]])
    srcs = [s for s, _ in pairs[:6]]  # batch invariance: one row at a time or all six together (other sources)
    assert [o.prediction for o in lm.generate_targets(srcs, steps=16, seed=3, bf16=False, batch_size=1)] == \
        [o.prediction for o in lm.generate_targets(srcs, steps=16, seed=3, bf16=False, batch_size=6)]
    with pytest.raises(DiffLMError, match="encoder reads at most 6"):  # seq_len 12: the source's half is 6
        lm.generate_targets(["a b c d e f a"])
    res = lm.evaluate("valid", samples=1, batch_size=32)
    assert res.nelbo < 0.1 * SRC_LEN, res  # nats per target token: the reversal is nearly certain


def greedy_by_full_passes(lm: DiffusionLM, source: str) -> str:
    """The AR model's greedy translation, one full forward pass per token (no KV cache): a second route."""
    tok = lm.tokenizer
    ids = tok.encode(source) + [tok.bos_id]
    L = lm.seq_len
    x = torch.tensor([ids + [tok.eos_id] * (L - len(ids))])
    for i in range(len(ids), L):
        with torch.no_grad():
            logits = lm.process.logits(bind_source(lm.model, lm.process, x), x)
        x[0, i] = logits[0, i].argmax()
        if x[0, i] == tok.eos_id:
            break
    out = x[0, len(ids):].tolist()
    return tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out)


@pytest.mark.slow  # trains small encoder-decoders (about 40 s together): make test-slow
def test_a_masked_model_refines_the_ar_models_drafts_by_mask_predict(learned):
    """AR bootstrap for a masked model: it starts from the AR model's translation (here a reversal) at iteration
    s of T; from s = 1 it re-masks nearly all of the draft and writes its own task (a copy); near T it keeps most."""
    _, ar = learned["autoregressive"]
    _, mdlm = learned["masked"]
    pairs = load_pairs(mdlm.run.data, "test")[:24]
    srcs = [s for s, _ in pairs]
    drafts = [o.prediction for o in ar.generate_targets(srcs, bf16=False, sampler_options={"greedy": True})]
    early = mdlm.generate_targets(srcs, draft_from=ar, steps=10, bf16=False, sampler_options={"start": 1})
    late = mdlm.generate_targets(srcs, draft_from=ar, steps=10, bf16=False, sampler_options={"start": 9})
    half = mdlm.generate_targets(srcs[:2], draft_from=ar, steps=10, bf16=False)
    assert all(o.nfe == 10 for o in early) and all(o.nfe == 2 for o in late) and all(o.nfe == 6 for o in half)
    copied = sum(o.prediction == s for o, s in zip(early, srcs)) / len(srcs)
    kept = sum(o.prediction == d for o, d in zip(late, drafts)) / len(srcs)
    assert copied >= 0.8 and kept >= 0.5, (copied, kept)
    with pytest.raises(DiffLMError, match="mask-predict"):
        mdlm.generate_targets(srcs[:1], draft_from=ar, sampler="ancestral")
    with pytest.raises(DiffLMError, match="or a masked one"):
        ar.generate_targets(srcs[:1], draft_from=ar)


@pytest.mark.slow  # trains small encoder-decoders (about 40 s together): make test-slow
def test_distill_data_writes_the_teachers_greedy_translations(learned, tmp_path, capsys):
    import json

    from difflm.cli import main

    d, lm = learned["autoregressive"]
    src = tmp_path / "pairs.jsonl"
    pairs = load_pairs(lm.run.data, "valid")[:6]
    src.write_text("".join(json.dumps({"id": i, "source": s, "target": t}) + "\n" for i, (s, t) in enumerate(pairs)))
    out = tmp_path / "distilled.jsonl"
    assert main(["distill-data", str(d / "run"), str(src), str(out), "--fp32", "--batch-size", "4"]) == 0  # 2 batches
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(6)) and [r["reference"] for r in rows] == [t for _, t in pairs]
    for r in rows:
        assert r["target"] == greedy_by_full_passes(lm, r["source"])
    assert main(["distill-data", str(d / "run"), str(src), str(out)]) == 2  # exists: --overwrite needed
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "a b", "target": " "}) + "\n")
    assert main(["distill-data", str(d / "run"), str(bad), str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "pair 1 has an empty target" in err and "Traceback" not in err
    md, _ = learned["masked"]
    assert main(["distill-data", str(md / "run"), str(src), str(tmp_path / "y.jsonl")]) == 2
    assert "needs the autoregressive teacher" in capsys.readouterr().err
    # a source longer than the encoder reads: refused with the flag to pass, then cut as training cut it
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"source": " ".join([pairs[0][0]] * 40), "target": "x"}) + "\n")
    assert main(["distill-data", str(d / "run"), str(long), str(tmp_path / "z.jsonl"), "--fp32"]) == 2
    err = capsys.readouterr().err
    assert "--truncate" in err and one_line_error(err)
    assert main(["distill-data", str(d / "run"), str(long), str(tmp_path / "z.jsonl"), "--fp32", "--truncate"]) == 0
    assert json.loads((tmp_path / "z.jsonl").read_text())["reference"] == "x"


def test_a_given_fill_is_fixed_and_unmodelled_and_target_lengths_are_counted():
    from difflm.data.datasets import make_batch, target_lengths

    tok = train_char(["abcdefgh"])
    x = rows(tok, [("abc", "de"), ("a", "bcdefg")], L=12)
    b = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id, fill_given=True)
    assert target_lengths(x, tok.bos_id, tok.eos_id).tolist() == [2, 6]
    assert b.loss_mask.sum(-1).tolist() == [2, 6] and torch.equal(b.fixed, ~b.loss_mask)
    eos = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    assert eos.loss_mask.sum(-1).tolist() == [8, 10]  # the fill is modelled when the length is not predicted


def test_the_bound_of_a_length_predicting_model_adds_the_length_term():
    """nelbo = the target tokens' bound (with the fill given) + −log p(ℓ | source): two routes to the same number."""
    tok = train_char(["abcdefgh ijklmnop"])
    run = RunConfig.from_dict({"model": {"n_layer": 1, "n_head": 2, "d_model": 32, "encoder_layers": 1},
                               "process": {"type": "autoregressive"},
                               "data": {"corpus": "pairs", "seq_len": 16, "target_length": "predicted"}})
    torch.manual_seed(0)
    model, process = build_components(run, tok)
    model.eval()
    assert model.cfg.length_classes == 17
    from difflm.data.datasets import make_batch, target_lengths

    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg")])
    b = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id, fill_given=True)
    with torch.no_grad():
        total = process.nelbo(model, b)
        r = bind_source(model, process, x)
        tokens = process.bound_terms(r, b).double().sum(-1)
        lp = torch.log_softmax(model.encode(r.source, r.mask, r.start).length_logits, -1)
    n = target_lengths(x, tok.bos_id, tok.eos_id)
    assert torch.allclose(total, tokens - lp[torch.arange(2), n].double(), atol=1e-5)


def test_length_prediction_needs_an_encoder():
    tok = train_char(["abc"])
    with pytest.raises(DiffLMError, match="needs an encoder-decoder"):
        build_components(RunConfig.from_dict({"data": {"corpus": "pairs", "target_length": "predicted"}}), tok)
    with pytest.raises(DiffLMError, match="eos or predicted"):
        RunConfig.from_dict({"data": {"corpus": "pairs", "target_length": "maybe"}})


def write_doubling(d, n_train: int = 3000) -> None:
    """Sources of 1–4 words; the target is the source twice over, so its length is a deterministic rule (2n)."""
    import json
    import random

    r = random.Random(0)
    for split, n in (("train", n_train), ("valid", 64), ("test", 64)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                src = [r.choice("abcdef") for _ in range(r.randint(1, 4))]
                f.write(json.dumps({"source": " ".join(src), "target": " ".join(src + src)}) + "\n")


@pytest.mark.slow  # trains small encoder-decoders (about 40 s together): make test-slow
def test_the_length_predictor_learns_a_deterministic_rule_and_mask_predict_decodes_with_it(tmp_path):
    from difflm.training.trainer import Trainer

    write_doubling(tmp_path)
    run = pairs_run(tmp_path, {"type": "masked"}, max_steps=300)
    run = RunConfig.from_dict({**run.to_dict(), "model": {"n_layer": 2, "n_head": 2, "d_model": 64,
                                                          "encoder_layers": 2},
                               "data": {**run.to_dict()["data"], "target_length": "predicted", "seq_len": 14},
                               "sample": {"sampler": "mask-predict", "steps": 4}})
    Trainer(run, tmp_path / "run", progress=False).fit()
    lm = DiffusionLM.from_pretrained(tmp_path / "run", device="cpu")
    pairs = load_pairs(lm.run.data, "test")
    srcs = [s for s, _ in pairs]
    best = lm._length_beam([lm.tokenizer.encode(s) for s in srcs], 1)
    right = sum(b[0] == 2 * len(s.split()) for b, s in zip(best, srcs)) / len(srcs)
    assert right >= 0.95, right
    outs = lm.generate_targets(srcs, bf16=False, length_beam=2)
    exact = sum(o.prediction == t for o, (_, t) in zip(outs, pairs)) / len(pairs)
    assert exact >= 0.9, (exact, [(o.source, o.prediction) for o in outs[:4]])
    assert all(len(o.candidates) == 2 for o in outs)


def test_spanish_characters_the_tokenizer_never_saw_are_translated_not_a_crash():
    from difflm.data import build_tokenizer

    run = RunConfig.from_dict({"model": {"n_layer": 1, "n_head": 2, "d_model": 32, "encoder_layers": 1},
                               "process": {"type": "masked"}, "tokenizer": {"type": "bpe", "vocab_size": 300},
                               "data": {"corpus": "pairs", "seq_len": 128}})
    tok = build_tokenizer(run.tokenizer, ["the earth was formless", "y la tierra estaba desordenada"])
    torch.manual_seed(0)
    model, process = build_components(run, tok)
    lm = DiffusionLM(model, process, tok, run, device="cpu")
    out = lm.generate_targets(["EN el principio crió Dios ñandú ☃ los cielos"], steps=4, bf16=False)
    assert len(out) == 1 and isinstance(out[0].prediction, str)
    assert tok.decode(tok.encode("ñandú ☃")) == "ñandú ☃"  # byte-level: nothing is lost


def test_the_cmlm_loss_weighs_each_rows_mean_masked_cross_entropy_by_its_length():
    """process.loss cmlm: a row's terms sum to n × (mean cross-entropy over its m masked tokens), on the very
    corruption the bound draws (keyed on the batch's rows); the bound's terms are the same cross-entropies × 1/t."""
    import torch.nn.functional as F

    from difflm.data.datasets import make_batch
    from difflm.diffusion.masked import MaskedDiffusion

    tok, model, _ = tiny("masked")
    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg"), ("a", "b")])
    batch = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    batch.u = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    batch.rows, batch.seed, batch.step = torch.arange(3), 0, 5
    cmlm = MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, loss="cmlm")
    elbo = MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id)
    net = bind_source(model, cmlm, x)
    with torch.no_grad():
        terms = cmlm.loss(net, batch)
        bound = elbo.loss(net, batch)
        t, w = elbo.times(batch.u)
        xt = elbo.corrupt(batch, t)
        ce = F.cross_entropy(elbo.subs_logits(net, xt, t).transpose(1, 2), x, reduction="none")
    masked = (xt == tok.mask_id) & batch.loss_mask
    assert masked.sum() > 0
    for b in range(3):
        n, m = int(batch.loss_mask[b].sum()), int(masked[b].sum())
        want = n * ce[b][masked[b]].mean() if m else torch.tensor(0.0)
        assert torch.allclose(terms[b].sum(), want.float(), rtol=1e-4), b
        assert torch.allclose(bound[b][masked[b]], (ce[b][masked[b]] * w[b]).float(), rtol=1e-4), b
    with pytest.raises(DiffLMError, match="process.loss must be elbo, cmlm or glat"):
        MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, loss="mse")


def test_glancing_reveals_lambda_times_the_first_passs_errors_and_trains_cmlm_on_the_rest():
    """process.loss glat (GLAT §3.2): a row shows ⌊λ·d⌋ of its target tokens, d the wrong tokens of one pass over
    the all-[MASK] row, at random target positions (never the source); the loss is cmlm's on those masks."""
    import torch.nn.functional as F

    from difflm.data.datasets import make_batch
    from difflm.diffusion.masked import MaskedDiffusion

    tok, model, _ = tiny("masked")
    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg"), ("a", "b")])
    probe = MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, loss="glat")
    free = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id).loss_mask
    with torch.no_grad():  # the first pass sees no target token, so setting targets to its guesses makes them right
        guess = probe.subs_logits(bind_source(model, probe, x), torch.where(free, tok.mask_id, x), None).argmax(-1)
    right = free & (torch.arange(16)[None, :] % 3 == 0)
    x = torch.where(right, guess, x)
    batch = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    batch.rows, batch.seed, batch.step = torch.arange(3), 0, 5
    d = (free & (guess != x)).sum(-1)
    assert (d < free.sum(-1)).all() and (d > 0).all()
    for lam in (0.0, 0.5, 1.0):
        glat = MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, loss="glat", glance_ratio=lam)
        net = bind_source(model, glat, x)
        with torch.no_grad():
            xt = glat.glancing_corrupt(net, batch)
            terms = glat.loss(net, batch)
            ce = F.cross_entropy(glat.subs_logits(net, xt, None).transpose(1, 2), x, reduction="none")
        shown = free & (xt != tok.mask_id)
        assert shown.sum(-1).tolist() == torch.floor(lam * d).long().tolist(), lam
        assert torch.equal(xt[~free], x[~free]) and torch.equal(xt[shown], x[shown])
        masked = free & (xt == tok.mask_id)
        for b in range(3):
            want = int(free[b].sum()) * ce[b][masked[b]].mean()
            assert torch.allclose(terms[b].sum(), want.float(), rtol=1e-4), (lam, b)
    # glance_mix: that share of the rows (keyed on seed, row, step) masked as cmlm masks them, the others glanced
    many = x[torch.arange(96) % 3]
    big = make_batch(many, tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    big.rows, big.seed, big.step, big.u = torch.arange(96), 0, 5, torch.rand(96, dtype=torch.float64)

    def terms_of(**kw):
        p = MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, glance_ratio=0.5, **kw)
        with torch.no_grad():
            return p.loss(bind_source(model, p, many), big)
    glanced, cmlm = terms_of(loss="glat"), terms_of(loss="cmlm")
    assert torch.allclose(terms_of(loss="glat", glance_mix=1.0), cmlm, atol=1e-5)
    assert torch.allclose(terms_of(loss="glat", glance_mix=0.0), glanced, atol=1e-5)
    half = terms_of(loss="glat", glance_mix=0.5)
    chosen = (big.rand(stream=2, width=1) < 0.5)[:, 0]
    sizes, encoded, forward, encode, was = [], [], model.forward, model.encode, model.training
    model.forward = lambda x, *a, **kw: sizes.append(len(x)) or forward(x, *a, **kw)
    model.encode = lambda src, *a, **kw: encoded.append(len(src)) or encode(src, *a, **kw)
    mix = MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, loss="glat", glance_mix=0.5)
    model.train()
    mix.loss(bind_source(model, mix, many), big).sum().backward()  # a training step
    model.forward, model.encode = forward, encode
    model.train(was)
    glanced_rows = int((~chosen).sum())
    assert sizes == [glanced_rows, 96] and encoded == [glanced_rows, 96]  # the first pass: the glanced rows alone
    assert 30 < int(chosen.sum()) < 66  # about half the rows
    assert torch.allclose(half[chosen], cmlm[chosen], atol=1e-5)
    assert torch.allclose(half[~chosen], glanced[~chosen], atol=1e-5)
    assert not torch.allclose(glanced, cmlm, atol=1e-3)  # the two maskings differ, so the check above could fail
    other = batch.__class__(batch.tokens, batch.loss_mask, batch.fixed)  # the reveal is keyed on (seed, row, step)
    other.rows, other.seed, other.step = torch.arange(3), 1, 5
    with torch.no_grad():
        assert not torch.equal(glat.glancing_corrupt(net, other), xt)
        assert torch.equal(glat.glancing_corrupt(net, batch), xt)


def edit_tiny(steps: int = 1, rate: float = 1e-9, encoder: bool = True):
    return random_net({"encoder_layers": int(encoder)}, {"type": "edit", "steps": steps, "edit_rate": rate})


def tagger_inputs(model) -> list[torch.Tensor]:
    """Spy on the backbone: the input rows of every tagger call (head "aux"), in order."""
    seen, forward = [], model.forward

    def spy(x, *args, **kw):
        if kw.get("head") == "aux":
            seen.append(x.clone())
        return forward(x, *args, **kw)

    model.forward = spy
    return seen


def test_the_blocks_layout_masks_the_context_that_semi_autoregressive_decoding_reads():
    """process.mask_layout blocks: in each row a block of mask_block free positions, drawn uniformly among those that
    reach the text (up to its first [EOS]), has at least one [MASK] and each other position [MASK] at rate 1 − α(t);
    everything before it is clean and everything after it [MASK]; the loss is cmlm's over the block's masks alone,
    and the draw is keyed on (seed, row, step), so a row is masked the same in any batch."""
    import torch.nn.functional as F

    from difflm.data.datasets import make_batch
    from difflm.diffusion.masked import MaskedDiffusion

    tok, model, _, _ = random_net({"encoder_layers": 1}, {"type": "masked"}, seq_len=24)
    pairs = [("abcd", "efgh ijklm"), ("ab", "cdefg"), ("a", "bcdefghijklmnop")]
    x = rows(tok, pairs, L=24)[torch.arange(600) % 3]
    batch = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    proc = MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, eos_id=tok.eos_id, loss="cmlm",
                           mask_layout="blocks", mask_block=3)
    batch.rows, batch.seed, batch.step = torch.arange(600), 0, 5
    batch.u = torch.full((600,), 0.5, dtype=torch.float64)
    t, _ = proc.times(batch.u)
    assert torch.allclose(1 - proc.schedule.alpha(t), torch.full_like(t, 0.5), atol=1e-4)
    xt, block = proc.block_corrupt(batch, t)
    free, mask = batch.free, xt == tok.mask_id
    assert torch.equal(xt[~free], x[~free]) and not (block & ~free).any()
    counts, starts = [], {0: [], 1: [], 2: []}
    for b in range(600):
        f = free[b].nonzero()[:, 0]
        text = int((x[b, f] == tok.eos_id).nonzero()[0, 0]) + 1  # the target's tokens and its first [EOS]
        inb = block[b, f].nonzero()[:, 0]
        s = int(inb[0])
        assert s % 3 == 0 and s < text and inb.tolist() == list(range(s, min(s + 3, len(f))))
        assert torch.equal(xt[b, f[:s]], x[b, f[:s]])  # the clean prefix
        assert mask[b, f[s + 3:]].all()  # everything after the block
        assert mask[b, f[inb]].any()  # at least one [MASK] in the block
        starts[b % 3].append(s // 3)
        if len(inb) == 3:
            counts.append(int(mask[b, f[inb]].sum()))
    # 3 positions at rate 1/2, one forced when none is drawn: 3/2 + 1/8 masks a block on average
    assert abs(sum(counts) / len(counts) - 1.625) < 0.15
    for k, (_, t_) in enumerate(pairs):  # the block index is uniform over the blocks that reach the text
        n = len(tok.encode(t_)) + 1
        seen = torch.bincount(torch.tensor(starts[k]), minlength=(n + 2) // 3)
        assert len(seen) == (n + 2) // 3 and (seen > 200 / len(seen) * 0.5).all(), (k, seen.tolist())
    sub = make_batch(x[7:19], tok.pad_id, tok.eos_id, "pairs", tok.bos_id)  # the same rows in a smaller batch
    sub.rows, sub.seed, sub.step, sub.u = torch.arange(7, 19), 0, 5, batch.u[7:19]
    assert torch.equal(proc.block_corrupt(sub, t[7:19])[0], xt[7:19])
    net = bind_source(model, proc, x[:6])
    small = make_batch(x[:6], tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    small.rows, small.seed, small.step, small.u = torch.arange(6), 0, 5, torch.rand(6, dtype=torch.float64)
    with torch.no_grad():
        terms = proc.loss(net, small)
        ts, _ = proc.times(small.u)
        xs, bs = proc.block_corrupt(small, ts)
        ce = F.cross_entropy(proc.subs_logits(net, xs, ts).transpose(1, 2), x[:6], reduction="none")
    counted = bs & (xs == tok.mask_id)
    assert (xs == tok.mask_id).sum() > counted.sum()  # masks after the block, which carry no loss
    assert torch.equal(terms != 0, counted)
    for b in range(6):
        want = int(small.loss_mask[b].sum()) * ce[b][counted[b]].mean()
        assert torch.allclose(terms[b].sum(), want.float(), rtol=1e-4), b
    with pytest.raises(DiffLMError, match="process.loss cmlm"):
        MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, mask_layout="blocks")
    with pytest.raises(DiffLMError, match="mask_layout must be random or blocks"):
        MaskedDiffusion(tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, loss="cmlm", mask_layout="prefix")


@pytest.mark.parametrize("layout", ["blocks", "random"])
def test_clean_targets_score_every_position_up_to_the_block_blind_to_its_own_token(layout):
    """Under clean-causal attention a shifted network reads a position's prediction off the state before it, which
    never reads that position: changing a clean target token changes no prediction at its own position (it does
    without the shift). So process.clean_targets scores the clean positions too, as if masked: the loss is each
    row's n × mean cross-entropy over every position up to the block's end (all target positions with random
    masks); and it is refused where a prediction could read its own token."""
    import torch.nn.functional as F

    from difflm.data.datasets import make_batch

    opts = {"type": "masked", "loss": "cmlm", "attention": "clean-causal", "mask_layout": layout, "mask_block": 3,
            "clean_targets": True}
    tok, model, proc, _ = random_net({"encoder_layers": 1, "shift": True}, opts, seq_len=24)
    x = rows(tok, [("abcd", "efgh ijklm"), ("ab", "cdefg"), ("a", "bcdefghijklmnop")], L=24)
    batch = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    batch.rows, batch.seed, batch.step, batch.u = torch.arange(3), 0, 5, torch.rand(3, dtype=torch.float64)
    net = bind_source(model, proc, x)
    with torch.no_grad():
        terms = proc.loss(net, batch)
        t, _ = proc.times(batch.u)
        xt, scored = proc.block_corrupt(batch, t) if layout == "blocks" else (proc.corrupt(batch, t), batch.loss_mask)
        logits = proc.subs_logits(net, xt, t)
        ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
        clean = (xt != tok.mask_id) & batch.free
        b, i = clean[:, :-1].nonzero()[-1].tolist()  # a clean target position (not the last): another token
        other = xt.clone()
        other[b, i] = tok.encode("z")[0]
        assert torch.allclose(proc.subs_logits(net, other, t)[b, i], logits[b, i], atol=1e-5)
        assert not torch.allclose(proc.subs_logits(net, other, t)[b, i + 1], logits[b, i + 1], atol=1e-4)
    counted = batch.loss_mask & ~((xt == tok.mask_id) & ~scored)
    assert torch.equal(terms != 0, counted) and (counted & clean).any()
    for r in range(3):
        want = int(batch.loss_mask[r].sum()) * ce[r][counted[r]].mean()
        assert torch.allclose(terms[r].sum(), want.float(), rtol=1e-4), r
    _, unshifted, unproc, _ = random_net({"encoder_layers": 1}, {**opts, "clean_targets": False}, seq_len=24)
    with torch.no_grad():
        un = bind_source(unshifted, unproc, x)
        assert not torch.allclose(unproc.subs_logits(un, other, t)[b, i], unproc.subs_logits(un, xt, t)[b, i],
                                  atol=1e-4)
    with pytest.raises(DiffLMError, match="needs model.shift"):
        random_net({"encoder_layers": 1}, opts)
    with pytest.raises(DiffLMError, match="process.attention clean-causal"):
        random_net({"encoder_layers": 1, "shift": True}, {**opts, "attention": "full"})


@pytest.mark.parametrize("encoder", [True, False])
def test_an_edit_encoder_decoder_learns_to_undo_corruption_of_the_target_not_the_path_from_the_source(encoder):
    """DiffusER with an encoder reads the source apart and is trained as the unconditional model, on corrupted
    targets read from position 0; without one it walks the edit path from the source. With T = 1 and (almost) no
    corruption, x_1 is then the target itself with an encoder, and the source itself without."""
    from difflm.data.datasets import make_batch

    tok, model, process, _ = edit_tiny(encoder=encoder)
    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg")])
    b = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    b.u, b.rows, b.seed, b.step = torch.tensor([0.3, 0.6], dtype=torch.float64), torch.arange(2), 0, 0
    net = bind_source(model, process, x)
    if encoder:
        assert net.start.tolist() == [0, 0]  # the decoder numbers x_t from its first token
    seen = tagger_inputs(model)
    with torch.no_grad():
        process.loss(net, b)
    want = ["efgh", "cdefg"] if encoder else ["abcd", "ab"]
    assert process.sequences(seen[0]) == [tok.encode(w) for w in want]


def test_an_edit_encoder_decoder_translates_from_random_tokens_or_a_draft_batch_invariantly():
    tok, model, process, run = edit_tiny(steps=4, rate=0.3)
    lm = DiffusionLM(model, process, tok, run, device="cpu")
    srcs = ["abcd", "ab", "abcdefg"]
    kw = {"steps": 4, "seed": 1, "bf16": False}
    one = [o.prediction for o in lm.generate_targets(srcs, batch_size=1, **kw)]
    assert one == [o.prediction for o in lm.generate_targets(srcs, batch_size=3, **kw)]
    seen = tagger_inputs(model)
    lm.generate_targets(srcs, **kw)
    first = process.sequences(seen[0])
    assert all(s != tok.encode(src) for s, src in zip(first, srcs))  # random tokens, not the source
    ar_tok, ar_model, ar_process = tiny("autoregressive")  # an AR drafter (the same characters, the same ids)
    ar = DiffusionLM(ar_model, ar_process, ar_tok, RunConfig.from_dict({**run.to_dict(), "process": {
        "type": "autoregressive"}}), device="cpu")
    drafts = [o.prediction for o in ar.generate_targets(srcs, bf16=False, sampler_options={"greedy": True})]
    seen.clear()
    lm.generate_targets(srcs, draft_from=ar, **kw)
    # revision starts at the AR model's greedy draft
    assert process.sequences(seen[0]) == [tok.encode(d)[:15] for d in drafts]
    with pytest.raises(DiffLMError, match="reads its source through an encoder"):
        lm.revise("abc")
    del model.forward
    single = edit_tiny(encoder=False)
    seen = tagger_inputs(single[1])
    DiffusionLM(single[1], single[2], single[0], single[3], device="cpu").generate_targets(srcs, **kw)
    assert process.sequences(seen[0]) == [tok.encode(s) for s in srcs]  # single stream: revision of the source


def test_the_ar_bound_computes_logits_only_where_it_counts_and_equals_the_full_pass():
    """The AR baseline's training terms run the output head at the modelled (target) positions only; they equal
    −log p from the full (B, L, V) pass at those positions, and are 0 at the source's."""
    from difflm.data.datasets import make_batch

    tok, model, process = tiny("autoregressive")
    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg")])
    b = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    net = bind_source(model, process, x)
    with torch.no_grad():
        terms = process.bound_terms(net, b)
        full = -process.log_probs(net, x).gather(-1, x[..., None])[..., 0]
    assert torch.equal(terms == 0, ~b.loss_mask)
    torch.testing.assert_close(terms[b.loss_mask], full[b.loss_mask], atol=1e-5, rtol=1e-5)


def test_absolute_positions_match_the_token_embeddings_scale_and_old_folders_keep_theirs():
    """The sinusoid is added at the token embeddings' initial RMS (it used to be 35 times larger); a model folder
    written before ``absolute_scale`` existed is rebuilt with the scale it was trained on (1.0): same outputs."""
    from difflm.components import folder_config
    from difflm.models.transformer import sinusoid

    tok, model, process = tiny("masked", absolute=True)
    pos = (model.cfg.absolute_scale * sinusoid(torch.arange(16), model.cfg.d_model)).pow(2).mean().sqrt()
    assert abs(float(pos) - 0.02) < 0.002  # the RMS of the embeddings' N(0, 0.02²) initialisation
    run = RunConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "encoder_layers": 1,
                                         "absolute_positions": True, "absolute_scale": 1.0},
                               "process": {"type": "masked"}, "data": {"corpus": "pairs", "seq_len": 16}})
    old, _ = build_components(run, tok)
    old.load_state_dict(model.state_dict())
    backbone = folder_config(run, tok, None, old)["backbone"]  # what config.json records
    del backbone["absolute_scale"]  # as the first version wrote it
    reread, _ = build_components(run, tok, backbone=backbone)
    reread.load_state_dict(old.state_dict())
    assert reread.cfg.absolute_scale == 1.0
    x = rows(tok, [("abcd", "efgh")])
    with torch.no_grad():
        a = bind_source(old.eval(), process, x)(x, torch.full((1,), 0.5))
        b = bind_source(reread.eval(), process, x)(x, torch.full((1,), 0.5))
    torch.testing.assert_close(a, b)


def adapted(tmp_path, family: str = "masked", **model):
    """A random AR encoder-decoder saved as a model folder, and a ``family`` model of the same shape started from it
    (model.init, the AR model's own tokenizer)."""
    from difflm.components import check_pretrained_tokenizer

    tok, ar, ar_process = tiny("autoregressive", seed=3)
    folder = tmp_path / "ar"
    run = RunConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "encoder_layers": 1},
                               "process": {"type": "autoregressive"}, "data": {"corpus": "pairs", "seq_len": 16}})
    DiffusionLM(ar, ar_process, tok, run).save_pretrained(folder)
    run = RunConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "encoder_layers": 1,
                                         "init": str(folder), **model},
                               "tokenizer": {"type": "hf", "path": str(folder)},
                               "process": {"type": family}, "data": {"corpus": "pairs", "seq_len": 16}})
    check_pretrained_tokenizer(run)
    net, process = build_components(run, tok)
    assert net.pretrained_init()
    return tok, ar, ar_process, net.eval(), process


def test_an_ar_model_adapted_with_shift_predicts_as_the_ar_model_under_a_causal_mask(tmp_path):
    """model.init copies every tensor of the AR folder; with model.shift the adapted masked model's output at row
    position i is read off position i − 1, so under a causal mask it computes exactly the AR model's next-token
    logits (two routes: the AR process's shifted input, the adapted model's shifted output); unshifted, it does
    not."""
    tok, ar, ar_process, net, _ = adapted(tmp_path, shift=True)
    for name, w in ar.state_dict().items():
        assert torch.equal(net.state_dict()[name], w), name
    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg")])
    tgt = ~source_mask(x, tok.bos_id)  # the target's tokens (after the [BOS])
    L = x.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    with torch.no_grad():
        want = ar_process.logits(bind_source(ar, ar_process, x), x)
        got = net(x, attn_mask=causal, memory=SourceReader.for_rows(net, x, tok.bos_id).memory())
        net.cfg.shift = False
        plain = net(x, attn_mask=causal, memory=SourceReader.for_rows(net, x, tok.bos_id).memory())
    real = want[tgt].isfinite()  # the AR process rules out tokens it never writes ([MASK], [PAD]) with −inf
    assert real.float().mean() > 0.5
    torch.testing.assert_close(got[tgt][real], want[tgt][real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[tgt][real], want[tgt][real], atol=1e-3)


def test_model_init_refuses_another_shape_another_tokenizer_and_shift_on_the_ar_family(tmp_path):
    from difflm.components import check_pretrained_tokenizer

    adapted(tmp_path)  # writes tmp_path/ar
    tok = train_char(["abcdefgh ijklmnop"])
    base = {"process": {"type": "masked"}, "data": {"corpus": "pairs", "seq_len": 16},
            "tokenizer": {"type": "hf", "path": str(tmp_path / "ar")}}
    wide = RunConfig.from_dict({**base, "model": {"n_layer": 2, "n_head": 2, "d_model": 64, "encoder_layers": 1,
                                                  "init": str(tmp_path / "ar")}})
    with pytest.raises(DiffLMError, match=r"weight is \(32, 32\) there and \(64, 64\) here"):
        build_components(wide, tok)[0].pretrained_init()
    deeper = RunConfig.from_dict({**base, "model": {"n_layer": 3, "n_head": 2, "d_model": 32, "encoder_layers": 1,
                                                    "init": str(tmp_path / "ar")}})
    with pytest.raises(DiffLMError, match="lacks blocks.2"):
        build_components(deeper, tok)[0].pretrained_init()
    other_tok = RunConfig.from_dict({**base, "tokenizer": {"type": "char"},
                                     "model": {"encoder_layers": 1, "init": str(tmp_path / "ar")}})
    with pytest.raises(DiffLMError, match="needs the checkpoint's own tokenizer"):
        check_pretrained_tokenizer(other_tok)
    with pytest.raises(DiffLMError, match="not a difflm model folder"):
        build_components(RunConfig.from_dict({**base, "model": {"n_layer": 2, "n_head": 2, "d_model": 32,
                                                                "encoder_layers": 1, "init": str(tmp_path)}}),
                         tok)[0].pretrained_init()
    with pytest.raises((DiffLMError, ValueError), match="already predicts the next token"):
        build_components(RunConfig.from_dict({**base, "process": {"type": "autoregressive"},
                                              "model": {"encoder_layers": 1, "shift": True}}), tok)


def test_annealing_starts_the_adapted_encoder_decoder_as_the_ar_model_and_ends_at_the_familys_mask(tmp_path):
    """model.anneal_steps on the transformer: at step 0 of training the adapted model's decoder attends causally, so
    it computes the AR model's logits with no mask given; from step N on (and at inference) it is the masked
    family's bidirectional decoder."""
    tok, ar, ar_process, net, _ = adapted(tmp_path, shift=True, anneal_steps=10)
    x = rows(tok, [("abcd", "efgh"), ("ab", "cdefg")])
    tgt = ~source_mask(x, tok.bos_id)
    with torch.no_grad():
        want = ar_process.logits(bind_source(ar, ar_process, x), x)
        real = want[tgt].isfinite()
        net.train().set_step(0)
        got = net(x, memory=SourceReader.for_rows(net, x, tok.bos_id).memory())
        torch.testing.assert_close(got[tgt][real], want[tgt][real], atol=1e-5, rtol=1e-5)
        net.set_step(5)
        half = net(x, memory=SourceReader.for_rows(net, x, tok.bos_id).memory())
        net.set_step(10)
        done = net(x, memory=SourceReader.for_rows(net, x, tok.bos_id).memory())
        net.eval()
        full = net(x, memory=SourceReader.for_rows(net, x, tok.bos_id).memory())
    torch.testing.assert_close(done, full)
    assert not torch.allclose(half[tgt], full[tgt], atol=1e-4) and not torch.allclose(full[tgt][real],
                                                                                        want[tgt][real], atol=1e-3)


def cache_model(n_layer: int, shift: bool, encoder: bool, llama: bool = False, attention: str = "full"):
    model = {"n_layer": n_layer, "shift": shift}
    model |= {"type": "llama", "n_kv_head": 1} if llama else {"encoder_layers": int(encoder)}
    return random_net(model, {"type": "masked", "attention": attention}, seq_len=20, seed=1,
                      train={"cond_dropout": 0.1})  # guidance too


@pytest.mark.parametrize("net", ["encoder-decoder", "single stream", "llama, grouped-query"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_the_block_caches_window_call_is_exact_where_no_stored_key_went_stale(net, shift, mode):
    """Fast-dLLM's cache (``BlockCache``): keys of the whole rows are stored, then tokens inside each row's block
    change and a window call recomputes the block. With one decoder layer a key depends only on its own token and
    position, so the stored keys outside the window are still exact and the window call must equal the full pass
    on the new rows (a stale key of the window read, a wrong position or a shifted state would break it). With two
    layers every key has read the changed tokens: the cache is an approximation there, and it shows."""
    from difflm.sampling.confidence import BlockCache

    encoder = net == "encoder-decoder"
    for n_layer, at_zero in ((1, False), (2, False), (1, True)):
        if at_zero and encoder:
            continue
        tok, backbone, process, _ = cache_model(n_layer, shift, encoder, llama=net.startswith("llama"))
        x = rows(tok, [("abcd", "ghij kl"), ("ab", "hgfe dcba"), ("abcdefg", "ab")], L=20)
        start = source_mask(x, tok.bos_id).sum(-1)  # each row's first target position (after its [BOS])
        old = x.clone()
        block = 3
        # the second block of each row's target, or (a single stream, nothing given) the row's first block
        a = torch.zeros_like(start) if at_zero else start + block
        inside = (torch.arange(20)[None] >= a[:, None]) & (torch.arange(20)[None] < a[:, None] + block)
        old[inside | (torch.arange(20)[None] >= a[:, None] + 1)] = process.mask_id  # the block and after: masked
        new = old.clone()
        new[inside & (torch.arange(20)[None] % 2 == 0)] = x[inside & (torch.arange(20)[None] % 2 == 0)]
        select = inside & (new == process.mask_id)
        model = bind_source(backbone, process, x) if encoder else backbone
        t, idx = torch.full((3,), 0.5), torch.arange(3)
        cache = BlockCache(mode, n_layer, block, rows=3)
        with torch.no_grad():
            first = cache.refresh(model, process, old, t, idx, select)
            torch.testing.assert_close(first, process.log_probs(model, old, t, select=select))
            got = cache.window(model, process, new, t, idx, select, a)
            want = process.log_probs(model, new, t, select=select)
        finite = want > -1e30
        if n_layer == 1:
            torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(got[finite], want[finite], atol=1e-3)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("encoder", [True, False])
def test_semi_ar_decoding_with_the_block_cache_is_exact_for_one_layer_and_batch_invariant(mode, encoder):
    """Threshold decoding in blocks with Fast-dLLM's cache: with one decoder layer every window call is exact (test
    above), so the text and the calls equal those of decoding without the cache, with classifier-free guidance too
    (its unconditional stream keeps its own cache); with two layers it is an approximation, still the same text at
    any batch size."""
    srcs = ["abcd", "ab", "abcdefg", "hgf"]
    for n_layer in (1, 2):
        tok, net, process, run = cache_model(n_layer, True, encoder)
        lm = DiffusionLM(net, process, tok, run, device="cpu")
        for w in (0.0, 1.0):
            kw = {"sampler": "threshold", "seed": 2, "bf16": False, "guidance": w,
                  "sampler_options": {"block": 3, "greedy": True, "threshold": 0.3}}
            plain = [(o.prediction, o.nfe) for o in lm.generate_targets(srcs, batch_size=4, **kw)]
            kw["sampler_options"]["kv_cache"] = mode
            cached = [(o.prediction, o.nfe) for o in lm.generate_targets(srcs, batch_size=4, **kw)]
            assert cached == [(o.prediction, o.nfe) for o in lm.generate_targets(srcs, batch_size=1, **kw)]
            if n_layer == 1:
                assert cached == plain, (w, cached, plain)
    with pytest.raises(DiffLMError, match="--block > 0"):
        lm.generate_targets(srcs, sampler="threshold", sampler_options={"kv_cache": "dual"})


@pytest.mark.parametrize("net", ["encoder-decoder", "single stream", "llama, grouped-query",
                                 "encoder-decoder, masks read masks"])
@pytest.mark.parametrize("shift", [True, False])
def test_the_causal_cache_of_a_clean_causal_model_decodes_exactly_as_without_it(net, shift):
    """``kv_cache: causal`` on a clean-causal model with two layers (where Fast-dLLM's cache is only approximate):
    the same text and calls as decoding without a cache, at blocks of 1 and 3, with and without guidance and
    stopping at [EOS], at any batch size; and a call's window spans only the last stored position through the
    block, never the whole row. Also under ``clean-causal-masks``, where a [MASK] reads the [MASK]s before it."""
    srcs = ["abcd", "ab", "abcdefg", "hgf"]
    tok, backbone, process, run = cache_model(2, shift, net.startswith("encoder-decoder"),
                                              llama=net.startswith("llama"),
                                              attention="clean-causal-masks" if "masks" in net else "clean-causal")
    lm = DiffusionLM(backbone, process, tok, run, device="cpu")
    widths: list[int] = []
    hook = backbone.blocks[0].register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[1]))
    for block, w, stop in ((1, 0.0, True), (3, 1.0, False), (3, 0.0, True)):
        kw = {"sampler": "threshold", "seed": 2, "bf16": False, "guidance": w,
              "sampler_options": {"block": block, "greedy": True, "threshold": 0.3, "stop_at_eos": stop}}
        plain = [(o.prediction, o.nfe) for o in lm.generate_targets(srcs, batch_size=4, **kw)]
        kw["sampler_options"]["kv_cache"] = "causal"
        widths.clear()
        cached = [(o.prediction, o.nfe) for o in lm.generate_targets(srcs, batch_size=4, **kw)]
        assert cached == plain, (block, w, cached, plain)
        # the first call runs through the longest source, its [BOS] and the first block; later ones from the last
        # stored position through the tokens the last call decided (at most a block) and the block now
        assert widths[0] == len("abcdefg") + 1 + block and max(widths[2 if w else 1:]) <= 2 * block + 1
        assert cached == [(o.prediction, o.nfe) for o in lm.generate_targets(srcs, batch_size=1, **kw)]
    hook.remove()
    for mode in ("prefix", "dual"):
        with pytest.raises(DiffLMError, match="use --kv-cache causal"):
            lm.generate_targets(srcs, sampler="threshold", sampler_options={"block": 2, "kv_cache": mode})
    full = DiffusionLM(*cache_model(2, shift, False)[1:3], tok, run, device="cpu")
    with pytest.raises(DiffLMError, match="exact only for a model with process.attention clean-causal"):
        full.generate_targets(srcs, sampler="threshold", sampler_options={"block": 2, "kv_cache": "causal"})


def test_stopping_at_eos_keeps_every_translation_and_saves_calls():
    """A row ends once it has an [EOS] with nothing masked before it: the text up to that [EOS] could not change
    any more, so every prediction is the one decoding to the end gives, in fewer calls where a row ends early."""
    srcs = ["abcd", "ab", "abcdefg", "hgf", "a", "dcba"]
    tok, net, process, run = cache_model(2, True, True)
    lm = DiffusionLM(net, process, tok, run, device="cpu")
    for opts in ({"block": 3}, {"block": 2, "kv_cache": "dual"}, {}):
        kw = {"sampler": "threshold", "seed": 2, "bf16": False,
              "sampler_options": {"greedy": True, "threshold": 0.3, **opts}}
        full = lm.generate_targets(srcs, **kw)
        kw["sampler_options"]["stop_at_eos"] = True
        short = lm.generate_targets(srcs, **kw)
        assert [o.prediction for o in short] == [o.prediction for o in full]
        assert all(s.nfe <= f.nfe for s, f in zip(short, full))
        if opts:  # in blocks some row ends before its last block
            assert sum(s.nfe for s in short) < sum(f.nfe for f in full), [o.prediction for o in full]


@pytest.mark.parametrize("encoder", [True, False])
def test_left_to_right_nll_of_a_seq2seq_model_follows_its_decoder(encoder):
    """A clean-causal shifted seq2seq model (encoder-decoder, or one stream with the source as prefix): the exact
    NLL of left-to-right decoding equals the decoder's own calls, one per target position, each made with the
    source and the target before it clean and the rest [MASK] — the source is never scored."""
    from difflm.data.datasets import make_batch
    from difflm.models.seq2seq import bind_source

    tok, net, proc, _ = cache_model(2, True, encoder, attention="clean-causal")
    x = rows(tok, [("abcd", "efgh ij"), ("ab", "cdefg"), ("a", "bcdefghijk")], L=20)
    batch = make_batch(x, tok.pad_id, tok.eos_id, "pairs", tok.bos_id)
    with torch.no_grad():
        got = proc.left_to_right_nll(net, batch)
        want = torch.zeros(3, dtype=torch.float64)
        pos = torch.arange(x.shape[1])
        for i in range(x.shape[1]):
            at = batch.loss_mask[:, i]
            if not at.any():
                continue
            xt = torch.where(batch.free & (pos >= i), tok.mask_id, x)
            logp = proc.log_probs(bind_source(net, proc, xt), xt, None)[:, i]
            want += torch.where(at, -logp.gather(-1, x[:, i : i + 1])[:, 0], 0.0).double()
    assert not batch.loss_mask[0, :5].any() and torch.allclose(got, want, atol=1e-4)  # "abcd" and [BOS]: given
