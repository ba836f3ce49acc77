"""Beam search over a clean-causal masked model's next-token predictions (``--sampler beam``)."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from test_encdec import cache_model
from test_speculative import infill_rows
from torch import nn

from difflm.diffusion import build_process
from difflm.errors import DiffLMError
from difflm.evaluation.generative import bench_samplers
from difflm.pipeline import DiffusionLM
from difflm.sampling import Conditioning, get_sampler, sampler_fits

EOS, MASK, PAD, V = 3, 4, 5, 6  # data tokens 0, 1, 2


class BigramNet(nn.Module):
    """A stand-in shifted network: the distribution it gives position p is ``table[x[p−1]]`` (``start`` at p = 0),
    whatever else the row holds, so the text's probability is a Markov chain's, and every text can be scored by
    hand."""

    def __init__(self, start: list[float], table: dict[int, list[float]]) -> None:
        super().__init__()
        self.start = torch.tensor(start).log()
        self.table = torch.full((V, 4), -30.0)
        for prev, p in table.items():
            self.table[prev] = torch.tensor(p).log()
        self.cfg = SimpleNamespace(shift=True)

    def forward(self, x, t=None, select=None, attn_mask=None, **kw):
        B, L = x.shape
        logits = torch.full((B, L, V), -30.0)
        logits[:, 0, :4] = self.start
        logits[:, 1:, :4] = self.table[x[:, :-1]]
        return logits if select is None else logits[select]


def process_with(attention: str = "clean-causal"):
    return build_process({"type": "masked", "attention": attention}, vocab_size=V,
                         special={"mask": MASK, "pad": PAD, "bos": None, "eos": EOS})


def by_hand(net: BigramNet, L: int) -> tuple[list[int], float]:
    """The text of highest Σ log p / length among every text of at most L tokens that ends at its [EOS] or at L,
    padded as the sampler pads it, and that score."""
    best, best_score = None, -math.inf
    for n in range(1, L + 1):
        for text in itertools.product(range(4), repeat=n):
            if EOS in text[:-1] or (n < L and text[-1] != EOS):
                continue
            lp = float(net.start[text[0]]) + sum(float(net.table[a, b]) for a, b in zip(text, text[1:]))
            if lp / n > best_score + 1e-9:
                best, best_score = list(text) + [PAD] * (L - n), lp / n
    return best, best_score


def decode(net: nn.Module, L: int, beam: int, rows: int = 2, attention: str = "clean-causal"):
    process = process_with(attention)
    return get_sampler("beam", process, beam=beam)(net, process, Conditioning.unconditional(rows, L), steps=L)


def test_beam_search_finds_the_text_greedy_decoding_misses_and_a_wide_beam_finds_the_best_text():
    """A chain where the likelier first token leads nowhere sure: greedy (beam 1) takes it, beam 2 takes the
    other, whose continuation is certain; a beam as wide as every prefix finds the best text by hand."""
    net = BigramNet([0.5, 0.45, 0.04, 0.01], {0: [0.32, 0.28, 0.2, 0.2], 1: [0.02, 0.02, 0.01, 0.95],
                                              2: [0.1, 0.1, 0.1, 0.7]})
    L = 4
    greedy = decode(net, L, 1).tokens.tolist()
    assert greedy == [[0, 0, 0, 0]] * 2  # argmax each step: 0, then 0 again
    assert decode(net, L, 2).tokens.tolist() == [[1, EOS, PAD, PAD]] * 2
    best, _ = by_hand(net, L)
    assert decode(net, L, 4 ** L).tokens.tolist() == [best] * 2


@pytest.mark.parametrize("seed", range(4))
def test_a_beam_as_wide_as_every_prefix_is_exhaustive_search(seed):
    """Random chains: a beam of 4^L hypotheses keeps every prefix, so it returns the text of highest score per
    token (ties aside: random tables have none), with one call per position."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(5, 4, generator=g).softmax(-1) if seed % 2 else torch.rand(5, 4, generator=g) ** 3 + 0.01
    probs = probs / probs.sum(-1, keepdim=True)
    net = BigramNet(probs[4].tolist(), {i: probs[i].tolist() for i in range(4)})
    L = 4
    out = decode(net, L, 4 ** L, rows=1)
    best, _ = by_hand(net, L)
    assert out.tokens.tolist() == [best]
    assert out.nfe.tolist() == [L]


@pytest.mark.parametrize("net", ["encoder-decoder", "single stream", "llama, grouped-query",
                                 "single stream, masks read masks"])
def test_beam_one_is_token_by_token_decoding_and_beams_are_batch_invariant_with_and_without_the_cache(net):
    """On random clean-causal shifted networks: beam 1 writes the text of greedy blocks of 1 that stops at [EOS]
    (with guidance too, and with the causal cache); beam 3 writes the same text in the same calls with the cache
    as without, whatever the batch size."""
    srcs = ["abcd", "ab", "abcdefg", "hgf", "a", "dcba"]
    tok, backbone, process, run = cache_model(2, True, net == "encoder-decoder", llama=net.startswith("llama"),
                                              attention="clean-causal-masks" if "masks" in net else "clean-causal")
    lm = DiffusionLM(backbone, process, tok, run, device="cpu")
    for w in (0.0, 1.0):
        kw = {"seed": 2, "bf16": False, "guidance": w}
        one = lm.generate_targets(srcs, sampler="threshold", batch_size=6,
                                  sampler_options={"block": 1, "greedy": True, "stop_at_eos": True}, **kw)
        for cache in ("none", "causal"):
            b1 = lm.generate_targets(srcs, sampler="beam", batch_size=6,
                                     sampler_options={"beam": 1, "kv_cache": cache}, **kw)
            assert [o.prediction for o in b1] == [o.prediction for o in one], (w, cache)
        beams = [lm.generate_targets(srcs, sampler="beam", batch_size=b, sampler_options={"beam": 3, "kv_cache": c},
                                     **kw) for b, c in ((6, "none"), (6, "causal"), (1, "causal"))]
        assert all([o.prediction for o in b] == [o.prediction for o in beams[0]] for b in beams[1:]), w
        assert all(o.nfe == beams[0][i].nfe for b in beams[1:] for i, o in enumerate(b))


def test_beam_search_keeps_an_infills_given_tokens_and_beam_one_fills_as_blocks_of_one():
    """A single-stream model filling the gaps around given tokens: beam 1 equals blocks of 1 that stop at [EOS]
    with and without the cache; a beam of 3 keeps every given token and fills every gap before its [EOS]."""
    _, backbone, process, cond = infill_rows()
    L = cond.shape[1]
    one = get_sampler("threshold", process, block=1, greedy=True, stop_at_eos=True)(backbone, process, cond,
                                                                                  steps=L).tokens
    for cache in ("none", "causal"):
        out = get_sampler("beam", process, beam=1, kv_cache=cache)(backbone, process, cond, steps=L).tokens
        assert torch.equal(out, one), cache
    wide = get_sampler("beam", process, beam=3, kv_cache="causal")(backbone, process, cond, steps=L).tokens
    assert torch.equal(wide[cond.fixed], cond.tokens[cond.fixed])
    assert not (wide == process.mask_id).any()


def test_beam_search_refuses_a_network_whose_clean_positions_do_not_predict_the_next_token():
    """Full attention, or clean-causal without the shift: a one-line error that says what the sampler needs; a beam
    of 0 or an approximate cache: a one-line error naming the option."""
    net = BigramNet([0.25] * 4, {})
    with pytest.raises(DiffLMError, match="clean-causal and model.shift"):
        decode(net, 4, 2, attention="full")
    net.cfg = SimpleNamespace(shift=False)
    with pytest.raises(DiffLMError, match="clean-causal and model.shift"):
        decode(net, 4, 2)
    full = build_process({"type": "masked"}, vocab_size=V, special={"mask": MASK, "pad": PAD})
    assert not sampler_fits("beam", full) and sampler_fits("beam", process_with())
    assert ("beam", {"beam": 4, "kv_cache": "causal"}) in bench_samplers("masked", process_with())
    assert "beam" not in {n for n, _ in bench_samplers("masked", full)}
    with pytest.raises(DiffLMError, match="--beam must be at least 1"):
        get_sampler("beam", process_with(), beam=0)
    with pytest.raises(DiffLMError, match="--kv-cache none or causal"):
        get_sampler("beam", process_with(), kv_cache="prefix")
