"""Self-speculative decoding for clean-causal masked models: parallel proposals, exact verification.

A masked model adapted from an AR parent with ``model.shift`` and ``process.attention: clean-causal`` is two models
in one network. The state at a clean position whose predecessors are all clean reads only them, so the prediction
it makes for the next position is the AR parent's kind: p(x_{i+1} | x_≤i), exactly what blocks-of-1 decoding reads.
The [MASK]s after the clean prefix predict the positions further on in parallel, each from the prefix alone: the
diffusion model's proposals. Blockwise parallel decoding (Stern et al. 2018, §3) uses both in one call:

  row     = committed prefix x_<c, drafts d_0 … d_{k−1} placed as clean tokens at c … c+k−1, then [MASK]s
            (with given tokens among the masked ones, as in an infill, "position c+j" reads "the j-th masked one")
  verify  a_j = argmax p(x_{c+j} | x_<c, d_<j) for j = 0 … k: the exact next-token predictions after each draft
  accept  the longest run d_<n with d_j = a_j, and a_n after it: n + 1 tokens, every one the token greedy
          blocks-of-1 decoding would write there
  propose when every draft held (n = k): the [MASK]s at c+k+1 … c+k+K predict the next drafts (K = ``draft``);
          after a rejection they were read off a wrong draft, so the next call proposes afresh from its own [MASK]s

So the text is that of ``threshold --block 1 --greedy`` (argmax, left to right; the same up to float rounding
in calls of other shapes, and for time-free networks, whose prediction does not read the share still masked),
in at most as many calls, usually fewer: each call writes one token for certain and every draft that agreed.
``kv_cache: causal`` keeps the committed prefix's keys (``CausalCache``; the drafts' keys are stored only once they
are accepted). Argmax only: no draws, so the result does not depend on the seed or the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..diffusion.masked import MaskedDiffusion
from ..errors import DiffLMError
from ..registry import option, register_sampler
from .base import OnStep, SampleOutput, Sampler, StepInfo, check_stop_at_eos, on_rows
from .conditioning import Conditioning
from .confidence import CausalCache, check_kv_cache


def exact_cache_only(kv_cache: str, what: str) -> None:
    """A one-line error unless ``kv_cache`` names the exact cache of a clean-causal model, or none."""
    if kv_cache not in ("none", "causal"):
        raise DiffLMError(f"{what} keeps only the exact cache: --kv-cache none or causal, not {kv_cache!r}")


@dataclass
class SpeculativeOptions:
    draft: int = option(4, "how many tokens past the certain next one each call proposes (the [MASK]s after the "
                           "drafts predict them at once); the next call keeps those its exact predictions agree with",
                        ge=1)
    kv_cache: Literal["none", "causal"] = option(
        "none", "causal: keep the committed prefix's keys and values (exact under clean-causal attention), so a call "
                "computes only the last committed position, the drafts and the proposing [MASK]s")
    stop_at_eos: bool = option(False, "end a row at its first generated [EOS]: the rest of it becomes [PAD]")
    stale: bool = option(False, "after a rejected draft, propose the predictions this call made past it anyway")

    def __post_init__(self) -> None:
        if self.draft < 1:
            raise DiffLMError("--draft must be at least 1 (tokens each call proposes past the next one)")
        exact_cache_only(self.kv_cache, "speculative decoding")


class NextTokenSampler(Sampler):
    """A masked-family sampler that reads a clean prefix's next-token predictions: it decodes only a model with
    clean-causal attention and ``model.shift`` (an AR parent adapted that way)."""

    families = ("masked",)
    # each subclass's ``unfit`` names what it reads the predictions for, then this
    NEEDS = ("it needs a masked model with process.attention clean-causal and model.shift true (an AR parent adapted "
             "that way); decode this one with --sampler threshold")

    @classmethod
    def fits(cls, process: MaskedDiffusion) -> bool:
        return getattr(process.options, "clean_causal", False)

    @classmethod
    def check(cls, model: nn.Module, process: MaskedDiffusion) -> None:
        """A one-line error unless the network's clean positions predict the next token from a clean prefix."""
        if not cls.fits(process) or not getattr(model.cfg, "shift", False):
            raise DiffLMError(cls.unfit)

    def causal_cache(self, model: nn.Module, rows: int, device: torch.device) -> CausalCache | None:
        """The exact cache ``kv_cache: causal`` asks for, for ``rows`` rows, once the network is checked to keep
        one; None without it."""
        if self.options.kv_cache != "causal":
            return None
        check_kv_cache(model)
        return CausalCache(len(model.blocks), rows, device)


@register_sampler
class SelfSpeculativeDecoding(NextTokenSampler):
    name = "speculative"
    Options = SpeculativeOptions
    bench = ({"draft": 2, "kv_cache": "causal"},)  # bench-sampling runs it on the models it fits
    step_free = True

    unfit = "speculative decoding verifies drafts with the next-token predictions of a clean prefix: " \
        + NextTokenSampler.NEEDS

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: MaskedDiffusion, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        self.default_rows(cond, rows, steps)
        self.check(model, process)
        check_stop_at_eos(self.options.stop_at_eos, process)
        B, L = cond.shape
        m, K, dev = process.mask_id, int(self.options.draft), cond.tokens.device
        x = cond.initial(m)
        pos = torch.arange(L, device=dev)
        nfe = torch.zeros(B, dtype=torch.long, device=dev)
        free0 = (~cond.fixed).sum(-1).clamp_min(1).double()
        drafts = torch.full((B, L), -1, dtype=torch.long, device=dev)  # proposed tokens at masked positions (−1: none)
        kv = self.causal_cache(model, B, dev)
        call = 0
        while (x == m).any():
            masked = x == m
            idx = masked.any(-1).nonzero().squeeze(-1)
            xm, dm = x[idx], drafts[idx]
            c = masked[idx].long().argmax(-1)  # (n,) each row's committed length: its first [MASK]
            # the masked positions in order (1, 2, … from c; a given token between them, as in an infill, is clean)
            order = masked[idx].long().cumsum(-1) * masked[idx]
            proposed = dm >= 0  # this call's drafts: on the first k masked positions
            k = proposed.sum(-1)
            xin = torch.where(proposed, dm, xm)
            # verify at the drafts and the masked position after them (exact predictions: everything before them is
            # clean), propose at the K masked positions after that
            select = (order > 0) & (order <= (k + 1 + K)[:, None])
            t = (masked[idx].sum(-1).double() / free0[idx]).float()
            if kv is None:
                logits = process.subs_logits(on_rows(model, idx), xin, t, select=select)
            else:
                logits = kv.call(on_rows(model, idx), process, xin, t, idx, select, settled=c, raw=True)
            nfe[idx] += 1
            pred = torch.full_like(xm, -1)
            pred[select] = logits.argmax(-1)
            # n: the drafts accepted (those before the first disagreement); the masked position n + 1 then takes
            # its exact prediction
            bad = proposed & (pred != dm)
            n = torch.where(bad, order - 1, k[:, None]).amin(-1)
            commit = (order > 0) & (order <= (n + 1)[:, None])
            new = torch.where(commit, pred, xm)  # an accepted draft is its prediction
            if self.options.stop_at_eos:  # the row ends at its first generated [EOS]
                eos = commit & (new == process.eos_id)
                first = torch.where(eos.any(-1), eos.long().argmax(-1), L)
                new = torch.where((pos[None] > first[:, None]) & ((new == m) | commit),
                                  torch.full_like(new, process.pad_id), new)
            # the next drafts: the predictions at the K masked positions after the committed ones (when a draft was
            # rejected, they were made with it in place: stale, still worth checking, as they cost no call)
            held = (n == k) | self.options.stale
            ahead = held[:, None] & select & (new == m) & (order > (n + 1)[:, None]) & (order <= (n + 1 + K)[:, None])
            drafts[idx] = torch.where(ahead, pred, torch.full_like(dm, -1))
            x = x.clone()
            x[idx] = new
            call += 1
            if on_step is not None:
                on_step(StepInfo(max(steps - call, 0), steps, 1.0, 0.0, x, nfe.clone()))
        return SampleOutput(x, nfe)
