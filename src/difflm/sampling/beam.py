"""Beam search for clean-causal masked models: the AR parent's decoding rule, kept after the adaptation.

A masked model adapted from an AR parent with ``model.shift`` and ``process.attention: clean-causal`` predicts the
first [MASK] after a clean prefix from that prefix alone: p(x_c | x_<c), an exact left-to-right factorisation (the
``speculative`` sampler's module docstring says why). Blocks-of-1 greedy decoding follows it by argmax; this
sampler searches it as an AR model's beam search does (Sutskever et al. 2014; the ``autoregressive`` sampler's
``beam``): per row the ``beam`` most probable partial texts are kept, each extended at its first [MASK] by every
token, and the best ``beam`` of the extensions kept.

  score   Σ log p_θ(x_c | x_<c) over the generated tokens; a given token (an infill's) is forced at no cost
  end     a hypothesis ends at its first generated [EOS]; its masked positions after it become [PAD] (as
          ``--stop-at-eos`` does) and it keeps its slot at its score
  pick    the hypothesis of highest score / length (length counts the [EOS]: length penalty 1, fairseq's default)

Rows never share a beam, so a row's text does not depend on the batch; beam 1 is ``threshold --block 1 --greedy
--stop-at-eos`` (ties aside). NFE counts one call per generated position, as left-to-right decoding does.
``kv_cache: causal`` stores each settled prefix once (``CausalCache``) and moves the stored keys with their
hypotheses. Under ``--guidance`` the scores are those of the guided distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..diffusion.masked import MaskedDiffusion
from ..errors import DiffLMError
from ..registry import option, register_sampler
from .base import OnStep, SampleOutput, StepInfo, on_rows
from .conditioning import Conditioning
from .speculative import NextTokenSampler, exact_cache_only


@dataclass
class BeamOptions:
    beam: int = option(4, "beam search over this many hypotheses per row (1 = off; deterministic, ignores "
                          "temperature and top_p; a hypothesis ends at its [EOS])", ge=1)
    kv_cache: Literal["none", "causal"] = option(
        "none", "causal: keep each hypothesis's settled prefix's keys and values (exact under clean-causal "
                "attention), so a call computes only its last position and the next")

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise DiffLMError("--beam must be at least 1 (1 = no beam search)")
        exact_cache_only(self.kv_cache, "beam search")


@register_sampler
class CleanCausalBeamSearch(NextTokenSampler):
    name = "beam"
    Options = BeamOptions
    bench = ({"beam": 4, "kv_cache": "causal"},)
    step_free = True

    unfit = "beam search follows the next-token predictions of a clean prefix: " + NextTokenSampler.NEEDS

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: MaskedDiffusion, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        """(B, L) tokens: each row's best hypothesis; ``steps``, ``seed``, temperature and top_p are not used."""
        self.default_rows(cond, rows, steps)
        self.check(model, process)
        B, L = cond.shape
        k, m, dev = int(self.options.beam), process.mask_id, cond.tokens.device
        eos = process.eos_id
        expand = torch.arange(B, device=dev).repeat_interleave(k)  # hypothesis h of row b sits at b·k + h
        net = on_rows(model, expand)
        x = cond.initial(m)[expand]
        pos = torch.arange(L, device=dev)
        free0 = (~cond.fixed).sum(-1).clamp_min(1).double()[expand]
        score = torch.full((B, k), float("-inf"), device=dev, dtype=torch.float64)
        score[:, 0] = 0.0  # one live hypothesis to start from: the k slots must not hold copies of it
        length = torch.zeros(B * k, dtype=torch.long, device=dev)
        done = torch.zeros(B * k, dtype=torch.bool, device=dev)
        nfe = torch.zeros(B, dtype=torch.long, device=dev)
        kv = self.causal_cache(model, B * k, dev)
        arange = torch.arange(B, device=dev)
        step = 0
        while True:
            masked = x == m
            live = masked.any(-1) & ~done & score.reshape(-1).isfinite()  # hypotheses with a position to fill
            if not bool(live.any()):
                break
            idx = live.nonzero().squeeze(-1)
            c = torch.where(masked.any(-1), masked.long().argmax(-1), L)  # (B·k,) each hypothesis's first [MASK]
            select = torch.zeros(len(idx), L, dtype=torch.bool, device=dev)
            select[torch.arange(len(idx), device=dev), c[idx]] = True
            t = (masked[idx].sum(-1).double() / free0[idx]).float()
            if kv is None:
                lp = process.log_probs(on_rows(net, idx), x[idx], t, select=select)
            else:
                lp = kv.call(on_rows(net, idx), process, x[idx], t, idx, select)
            nfe[expand[idx].unique()] += 1
            V = lp.shape[-1]
            # a hypothesis that is not extended now (ended, or waiting: -inf) stays as it is, at no cost, once
            logp = torch.full((B * k, V), float("-inf"), device=dev, dtype=torch.float64)
            logp[idx] = lp.double()
            logp[~live, 0] = 0.0
            cand = (score.reshape(-1, 1) + logp).reshape(B, k * V)
            best, ind = cand.topk(k, dim=-1)  # sorted: slot 0 is the row's best so far
            origin = (arange[:, None] * k + ind // V).reshape(-1)
            tok = (ind % V).reshape(-1)
            grew = live[origin] & best.reshape(-1).isfinite()
            x, done, length, c = x[origin], done[origin], length[origin], c[origin]
            if kv is not None:
                kv.reorder(origin)
            r = grew.nonzero().squeeze(-1)
            x[r, c[r]] = tok[r]
            length = length + grew.long()
            if eos is not None:
                done = done | (grew & (tok == eos))
            score = best
            step += 1
            if on_step is not None:
                on_step(StepInfo(max(steps - step, 0), steps, 1.0, 0.0, x[::k], nfe.clone()))
        norm = (score.reshape(-1) / length.clamp_min(1)).reshape(B, k)
        pick = arange * k + norm.argmax(-1)
        x = x[pick]
        if eos is not None:  # an ended hypothesis's masked positions after its [EOS] are [PAD]
            ended = (x == eos) & ~cond.fixed
            first = torch.where(ended.any(-1), ended.long().argmax(-1), L)
            x = torch.where((pos[None] > first[:, None]) & (x == m), torch.full_like(x, process.pad_id), x)
        return SampleOutput(x, nfe)
