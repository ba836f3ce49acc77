"""Self-speculative decoding (``--sampler speculative``): [MASK]s propose, clean positions verify."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_encdec import cache_model
from torch import nn

from difflm.diffusion import build_process
from difflm.errors import DiffLMError
from difflm.evaluation.generative import bench_samplers
from difflm.pipeline import DiffusionLM
from difflm.sampling import Conditioning, get_sampler, sampler_fits

V, MASK, PAD = 12, 10, 11


class PositionNet(nn.Module):
    """A stand-in shifted network under clean-causal attention: the token it predicts at position p is ``f[p]``
    when the position before p holds a clean token (the exact next-token prediction a clean prefix gives) and
    ``g[p]`` when it holds a [MASK] (a [MASK]'s proposal for a later position); it never reads x[p] itself."""

    def __init__(self, f: list[int], g: list[int]) -> None:
        super().__init__()
        self.f, self.g = torch.tensor(f), torch.tensor(g)
        self.cfg = SimpleNamespace(shift=True)

    def forward(self, x, t=None, select=None, attn_mask=None, **kw):
        B, L = x.shape
        before = torch.cat([torch.zeros(B, 1, dtype=torch.bool), x[:, :-1] == MASK], 1)  # [MASK] before p?
        tok = torch.where(before, self.g[:L][None], self.f[:L][None])
        logits = torch.nn.functional.one_hot(tok, V).float() * 5.0
        return logits if select is None else logits[select]


def decode(net: nn.Module, L: int, draft: int, rows: int = 2, attention: str = "clean-causal", stale: bool = False):
    process = build_process({"type": "masked", "attention": attention}, vocab_size=V,
                            special={"mask": MASK, "pad": PAD, "bos": None, "eos": None})
    sampler = get_sampler("speculative", process, draft=draft, stale=stale)
    return sampler(net, process, Conditioning.unconditional(rows, L), steps=L)


@pytest.mark.parametrize("L,draft", [(16, 3), (17, 1), (9, 8), (5, 4)])
def test_every_draft_held_each_call_after_the_first_writes_draft_plus_one_tokens(L, draft):
    """A network whose [MASK]s propose exactly what the clean prefix then predicts: the first call writes one token
    and proposes ``draft``; every later call accepts them all and adds one more, so a row of L takes
    1 + ⌈(L − 1) / (draft + 1)⌉ calls, and its text is the exact predictions."""
    f = [(3 * p + 1) % 10 for p in range(L)]
    out = decode(PositionNet(f, f), L, draft)
    assert out.tokens.tolist() == [f, f]
    assert out.nfe.tolist() == [1 + math.ceil((L - 1) / (draft + 1))] * 2


def test_a_rejected_draft_costs_nothing_but_its_call_and_never_reaches_the_text():
    """Proposals that are all wrong: each call writes one token, the exact prediction (never the draft), so the
    calls are those of token-by-token decoding; where only some proposals are right, the text is still the exact
    one, in fewer calls."""
    L = 14
    f = [p % 10 for p in range(L)]
    wrong = [(p + 5) % 10 for p in range(L)]
    out = decode(PositionNet(f, wrong), L, 3)
    assert out.tokens.tolist() == [f, f] and out.nfe.tolist() == [L, L]
    half = [f[p] if p % 3 else wrong[p] for p in range(L)]  # every third proposal wrong
    out = decode(PositionNet(f, half), L, 3)
    assert out.tokens.tolist() == [f, f] and (out.nfe < L).all()
    # ``stale``: after a rejection, the exact predictions this call made past it (here right, as they read a clean
    # position before them whatever it holds) are the next drafts: fewer calls, the same text
    stale = decode(PositionNet(f, wrong), L, 3, stale=True)
    assert stale.tokens.tolist() == [f, f] and (stale.nfe < L).all()


@pytest.mark.parametrize("net", ["encoder-decoder", "single stream", "llama, grouped-query",
                                 "single stream, masks read masks"])
def test_speculative_decoding_writes_the_text_of_token_by_token_decoding_in_fewer_calls(net):
    """On random clean-causal shifted networks: the same translations as greedy blocks-of-1 decoding (without
    guidance stopping at [EOS], with guidance decoding every position), with and without the causal KV cache;
    never more calls, fewer somewhere; the same text and calls at batch size 1."""
    srcs = ["abcd", "ab", "abcdefg", "hgf", "a", "dcba"]
    tok, backbone, process, run = cache_model(2, True, net == "encoder-decoder", llama=net.startswith("llama"),
                                              attention="clean-causal-masks" if "masks" in net else "clean-causal")
    lm = DiffusionLM(backbone, process, tok, run, device="cpu")
    fewer = 0
    for w, stop in ((0.0, True), (1.0, False)):
        kw = {"seed": 2, "bf16": False, "guidance": w}
        one = lm.generate_targets(srcs, sampler="threshold", batch_size=6,
                                  sampler_options={"block": 1, "greedy": True, "stop_at_eos": stop}, **kw)
        for cache in ("none", "causal"):
            opts = {"draft": 3, "stop_at_eos": stop, "kv_cache": cache, "stale": cache == "causal"}
            spec = lm.generate_targets(srcs, sampler="speculative", batch_size=6, sampler_options=opts, **kw)
            assert [o.prediction for o in spec] == [o.prediction for o in one], (w, stop, cache)
            assert all(s.nfe <= o.nfe for s, o in zip(spec, one))
            fewer += sum(s.nfe < o.nfe for s, o in zip(spec, one))
        alone = lm.generate_targets(srcs, sampler="speculative", batch_size=1, sampler_options=opts, **kw)
        assert [(o.prediction, o.nfe) for o in alone] == [(o.prediction, o.nfe) for o in spec]
    assert fewer > 0


def test_speculative_decoding_refuses_a_network_whose_clean_positions_do_not_predict_the_next_token():
    """Full attention, or clean-causal without the shift: a one-line error that says what the sampler needs."""
    f = list(range(8))
    with pytest.raises(DiffLMError, match="clean-causal and model.shift"):
        decode(PositionNet(f, f), 8, 2, attention="full")
    unshifted = PositionNet(f, f)
    unshifted.cfg = SimpleNamespace(shift=False)
    with pytest.raises(DiffLMError, match="clean-causal and model.shift"):
        decode(unshifted, 8, 2)
    process = build_process({"type": "masked"}, vocab_size=V, special={"mask": MASK, "pad": PAD})
    assert not sampler_fits("speculative", process)  # bench lists, the server's model card and its 400 leave it out
    process = build_process({"type": "masked", "attention": "clean-causal"}, vocab_size=V,
                            special={"mask": MASK, "pad": PAD})
    assert sampler_fits("speculative", process)
    # bench-sampling runs it on a clean-causal model, not on others
    assert ("speculative", {"draft": 2, "kv_cache": "causal"}) in bench_samplers("masked", process)
    assert "speculative" not in {n for n, _ in bench_samplers("masked", build_process(
        {"type": "masked"}, vocab_size=V, special={"mask": MASK, "pad": PAD}))}
    with pytest.raises(DiffLMError, match="--draft must be at least 1"):
        get_sampler("speculative", process, draft=0)
    with pytest.raises(DiffLMError, match="--kv-cache none or causal"):
        get_sampler("speculative", process, kv_cache="dual")


def infill_rows(L: int = 20):
    """A single-stream clean-causal shifted random network and three infill rows: a prompt, then a given span of 3
    tokens amid the gaps: (tokenizer, network, process, Conditioning)."""
    tok, backbone, process, _ = cache_model(2, True, False, attention="clean-causal")
    cond = Conditioning.unconditional(3, L, fill=process.mask_id)
    for r, (a, span) in enumerate(((2, 7), (1, 9), (4, 5))):
        ids = tok.encode("abcdefgh")
        cond.tokens[r, :a], cond.fixed[r, :a] = torch.tensor(ids[:a]), True
        cond.tokens[r, span:span + 3], cond.fixed[r, span:span + 3] = torch.tensor(ids[5:8]), True
    return tok, backbone, process, cond


def test_speculative_infilling_around_a_given_span_writes_the_text_of_token_by_token_decoding():
    """A single-stream clean-causal model filling the gaps around given tokens (a prompt, a span in the middle):
    drafts lie only on masked positions and skip the given ones; the same tokens as blocks of 1, with and without
    the cache and stale drafts, at batch sizes 3 and 1."""
    tok, backbone, process, cond = infill_rows()
    L = cond.shape[1]
    one = get_sampler("threshold", process, block=1, greedy=True)(backbone, process, cond, steps=L).tokens
    for cache, stale in (("none", False), ("causal", True)):
        smp = get_sampler("speculative", process, draft=3, kv_cache=cache, stale=stale)
        out = smp(backbone, process, cond, steps=L)
        assert torch.equal(out.tokens, one), (cache, stale)
        alone = torch.cat([smp(backbone, process, cond.rows(slice(i, i + 1)), steps=L).tokens for i in range(3)])
        assert torch.equal(alone, one)


@pytest.mark.parametrize("sampler", ["speculative", "threshold"])
def test_stop_at_eos_without_an_eos_token_is_a_one_line_error(sampler):
    """``--stop-at-eos`` on a model whose tokenizer has no [EOS]: the error names the option and the need."""
    f = list(range(8))
    process = build_process({"type": "masked", "attention": "clean-causal"}, vocab_size=V,
                            special={"mask": MASK, "pad": PAD, "bos": None, "eos": None})
    smp = get_sampler(sampler, process, stop_at_eos=True)
    with pytest.raises(DiffLMError, match=r"--stop-at-eos needs a tokenizer with an \[EOS\] token"):
        smp(PositionNet(f, f), process, Conditioning.unconditional(1, 8), steps=8)
