"""Edit Flows: the alignment's columns give back source and target, the mixture path runs from the source
(κ = 0) to the target (κ = 1) and its pending edits turn x_τ into the target, the Bregman loss trains a tiny
model that then generates its one training sentence by τ-leaping from the empty sequence, batch-invariantly."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflm.components import build_components
from difflm.config import RunConfig
from difflm.data.tokenizers import train_char
from difflm.diffusion.base import Batch
from difflm.diffusion.editflow import EPS, EditFlow

seqs = st.lists(st.integers(0, 5), max_size=10)


def apply_pending(x: list[int], todo: list[tuple]) -> list[int]:
    """Make all pending edits of x_τ at once (positions are x_τ's)."""
    ins: dict[int, list[int]] = {}
    for kind, p, tok in todo:
        if kind == "ins":
            ins.setdefault(p, []).append(tok)
    change = {p: (kind, tok) for kind, p, tok in todo if kind != "ins"}
    out = []
    for i in range(len(x) + 1):
        out.extend(ins.get(i, []))
        if i < len(x):
            kind, tok = change.get(i, ("keep", None))
            if kind == "keep":
                out.append(x[i])
            elif kind == "sub":
                out.append(tok)
    return out


@settings(max_examples=150, deadline=None)
@given(seqs, seqs, st.floats(0, 1), st.integers(0, 10**6))
def test_the_mixture_path_and_its_pending_edits(src, tgt, kappa, seed):
    cols = EditFlow.columns(src, tgt)
    assert [a for a, _ in cols if a != EPS] == src and [b for _, b in cols if b != EPS] == tgt
    rng = random.Random(seed)
    x0, todo0 = EditFlow.mix(cols, 0.0, rng)
    x1, todo1 = EditFlow.mix(cols, 1.0, rng)
    assert x0 == src and x1 == tgt and todo1 == []
    x, todo = EditFlow.mix(cols, kappa, rng)
    assert apply_pending(x, todo) == tgt and apply_pending(x0, todo0) == tgt


def make(seq_len=16):
    tok = train_char(["abcdefgh "])
    run = RunConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "d_model": 48},
                               "process": {"type": "editflow"}, "data": {"mode": "lines", "seq_len": seq_len}})
    model, process = build_components(run, tok)
    return model, process, tok


def test_a_tiny_model_learns_its_sentence_and_samples_batch_invariantly():
    from difflm.sampling import get_sampler
    from difflm.sampling.conditioning import Conditioning

    torch.manual_seed(0)
    model, p, tok = make()
    target = tok.encode("bad cafe")
    x = p.pack([target] * 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(500):
        b = Batch(x, x != p.pad_id, torch.zeros_like(x, dtype=torch.bool), rows=torch.arange(16), step=step)
        loss = p.loss(model, b).sum() / 16
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = get_sampler("tau-leaping", p)
    out = s(model.eval(), p, Conditioning.unconditional(8, 16), steps=64, seed=1, temperature=0.5).tokens
    got = p.sequences(out)
    assert sum(g == target for g in got) >= 4, [tok.decode(g) for g in got]
    parts = [s(model, p, Conditioning.unconditional(len(r), 16), steps=64, seed=1, rows=r, temperature=0.5).tokens
             for r in torch.arange(8).split(3)]
    assert torch.equal(torch.cat(parts), out)
