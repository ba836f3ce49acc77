"""Every sampler of every family: the same seed gives the same sequences whatever the batch size (1, 3, 8),
with real (untrained, time-conditioned where the family allows) transformers, conditioning included.
Reference fast decoders change their output with the batch; ours must not."""

import pytest
import torch
from conftest import TINY_PROCESSES

from difflm.components import build_components
from difflm.config import RunConfig
from difflm.data import build_tokenizer
from difflm.errors import DiffLMError
from difflm.sampling import Conditioning, get_sampler, sampler_fits, sampler_names

L = 10
OPTIONS = {"confidence": [{}, {"block": 4, "score": "margin"}], "threshold": [{"threshold": 0.5, "block": 5}],
           "remdm": [{"eta": 0.05}, {"eta": 0.5, "strategy": "rescale"}], "ddim": [{"eta": 0.0}],
           "dpm-solver": [{}, {"clamp": True}], "block": [{}, {"cache": False}, {"stop_at_eos": True}],
           "mask-predict": [{"draw": True}]}


def cases():
    for fam in TINY_PROCESSES:
        process = built(fam)[1]
        for name in sampler_names():
            if sampler_fits(name, process):
                for opts in OPTIONS.get(name, [{}]):
                    yield fam, name, opts


def built(family: str):
    run = RunConfig.from_dict({"data": {"seq_len": L}, "model": {"n_layer": 1, "n_head": 2, "d_model": 32},
                               "process": TINY_PROCESSES[family]})
    tok = build_tokenizer(run.tokenizer, ["a b c d e f g"])
    torch.manual_seed(0)
    model, process = build_components(run, tok)
    for p in model.parameters():  # untrained but not degenerate: spread-out predictions
        p.data.normal_(0, 0.1)
    return model.eval(), process, tok


@pytest.mark.parametrize("family,name,opts", list(cases()))
def test_same_seed_same_sequences_at_batch_sizes_1_3_8(family, name, opts):
    model, process, tok = built(family)
    smp = get_sampler(name, process, **opts)
    cond = Conditioning.unconditional(8, L, fill=tok.mask_id)
    cond.tokens[:, 0] = tok.encode("c")[0]  # a given first token (a prefix, which every family honours)
    cond.fixed[:, 0] = True
    full = smp(model, process, cond, steps=12, seed=5).tokens
    for size in (1, 3):
        parts = [smp(model, process, cond.rows(slice(a, a + size)), steps=12, seed=5,
                     rows=torch.arange(a, min(a + size, 8))).tokens for a in range(0, 8, size)]
        assert torch.equal(full, torch.cat(parts)), (family, name, opts, size)
    assert len({tuple(r) for r in full.tolist()}) > 1  # rows differ: each row has its own random stream


STEPLESS = {"first-hitting", "autoregressive"}  # one network call per token; they take no step budget


@pytest.mark.parametrize("family,name,opts", [c for c in cases() if c[1] not in STEPLESS])
def test_a_step_budget_below_one_is_a_clear_error(family, name, opts):
    model, process, tok = built(family)
    with pytest.raises(DiffLMError, match="at least 1"):
        get_sampler(name, process, **opts)(model, process, Conditioning.unconditional(2, L, fill=tok.mask_id),
                                           steps=0, seed=0)
