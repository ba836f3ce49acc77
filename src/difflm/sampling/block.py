"""Block-by-block sampling for block diffusion (BD3-LM, arXiv 2503.09573, Alg. 2).

Blocks are generated left to right. Within block b, K = ``steps`` // n_blocks MDLM ancestral steps
t = k/K -> (k−1)/K unmask each masked position with probability (α_s − α_t)/(1 − α_t), drawing from x̂0 given the block's
current state and the clean blocks before it; the network is time-free, so a row's x̂0 is reused while its
block has not changed (at most one call per change, as MDLM's cached sampler).

With ``cache`` the clean blocks live in the backbone's KV cache (the same ``KVCache`` the autoregressive
baseline decodes with): a finished block is written to it by the first call of the next block, one forward
pass over [clean block b−1, x_t block b] with the block-causal mask, keeping only the first part. Without
``cache`` every call recomputes the whole prefix under the block-causal mask. Both give the same tokens, in
bf16 too: both attend over a static cache of L key slots (the unwritten ones masked; the recomputing route
uses a throwaway one), so every attention row sums over L keys in both and the kernels add in the same order.
Under ``process.attention: clean-causal`` every route uses that mask instead (the prefix read causally, a
position of the block reading the clean positions up to it and itself), per row since it depends on which
positions are still [MASK]. With ``stop_at_eos`` a row ends at the first [EOS] it generates: the rest of the
row becomes [PAD] and the row makes no more calls (variable-length generation).

``greedy`` takes each unmasked position's most probable token (temperature 0). ``threshold`` τ > 0 replaces the
ancestral steps by Fast-dLLM v2's parallel decoding (arXiv 2509.26328, with Fast-dLLM's threshold rule,
arXiv 2505.22618 §3.3): each call unmasks, with its most probable token, every masked position of the block whose
probability exceeds τ, and at least the most confident one, so a block takes between 1 and S calls and the
step budget is not used. ``order`` left-to-right or confidence fills one position a call (the first masked one, or
the one whose best token is most probable), drawn at the temperature: S calls a block, the budget unused. With an
exact denoiser every order samples the true distribution; an adapted clean-causal model reads every prediction off
a clean state only left to right.

Given positions anywhere in the row (an infill's text between gaps) stay as given and are read as clean tokens once
their block is reached: a gap reads the text before it (and, in its own block, under block-causal attention, the
given tokens after it), never the blocks after it. ``DiffusionLM.infill(candidates=N)`` lets that text choose.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.block import BlockDiffusion, block_causal
from ..errors import DiffLMError
from ..models.transformer import KVCache
from ..registry import option, register_sampler
from ..rng import uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo, check_stop_at_eos, on_rows
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning

Order = Literal["random", "left-to-right", "confidence"]
ORDERS = typing.get_args(Order)


@dataclass
class BlockSamplerOptions:
    cache: bool = option(True, "keep the clean blocks' keys/values in the KV cache (off: recompute the prefix "
                         "at every call)", flag="--no-kv-cache")
    stop_at_eos: bool = option(False, "end each sequence at the first [EOS] it generates (variable length)")
    greedy: bool = option(False, "take the most probable token at each unmasked position (temperature 0)")
    threshold: float = option(0.0, "parallel decoding (Fast-dLLM v2): each call unmasks every position of the "
                              "block more probable than this, and the most confident one, with argmax tokens; the "
                              "step budget is then unused (0: BD3-LM's ancestral steps)", ge=0.0, le=1.0)
    order: Order = option("random", "which masked positions of the block a step fills. random: BD3-LM's ancestral "
                          "steps; left-to-right: one a call, the first still masked (the block's S calls, the step "
                          "budget unused: a clean-causal model then samples its left-to-right likelihood, "
                          "difflm eval --left-to-right); confidence: one a call, the one whose most probable token "
                          "is most probable. The token is drawn at the temperature (or taken greedily)")


@register_sampler
class BlockSampler(Sampler):
    name = "block"
    families = ("block",)
    Options = BlockSamplerOptions
    bench = ({}, {"cache": False}, {"threshold": 0.9})

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.cache, self.stop_at_eos = bool(self.options.cache), bool(self.options.stop_at_eos)
        self.threshold = float(self.options.threshold)
        self.greedy = bool(self.options.greedy) or self.threshold > 0
        self.order = str(self.options.order)
        if self.order not in ORDERS:
            raise DiffLMError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.threshold and self.order != "random":
            raise DiffLMError("threshold decoding chooses its own positions: leave order at random")

    @classmethod
    def free_of_steps(cls, options: dict) -> bool:  # threshold decoding and one-a-call orders ignore the budget
        return float(options.get("threshold", 0.0)) > 0 or options.get("order", "random") != "random"

    def _log_probs(self, model: nn.Module, process: BlockDiffusion, x: Tensor, a: int, e: int,
                   cache: KVCache | None, committed: int, idx: Tensor) -> Tensor:
        """log p_θ(x0 | block [a, e) of x, clean x[:, :a]) for rows ``idx``: (n, e − a, V) float32. With a
        cache holding x[:, :committed], the positions [committed, a) are written to it in the same call."""
        S, cc = process.block_size, process.options.clean_causal
        if len(idx) < x.shape[0]:  # an encoder-decoder reads the sources of these rows only
            model = on_rows(model, idx)
        if cache is None:  # the whole prefix, block-causal, in a throwaway static cache of the row's length
            xs = x[idx, :e]
            blk = torch.arange(e, device=x.device) // S
            sel = torch.zeros_like(xs, dtype=torch.bool)
            sel[:, a:e] = True
            scratch = KVCache(len(model.blocks), capacity=x.shape[1])
            mask = process.clean_causal_mask(xs) if cc else block_causal(blk, blk)
            out = model(xs, attn_mask=mask, select=sel, cache=scratch).view(len(idx), e - a, -1)
        elif committed < a:  # fused: write the finished block(s) [committed, a) and denoise [a, e)
            assert len(idx) == x.shape[0], "the cache is written for every row at once"
            blk = torch.arange(committed, e, device=x.device) // S
            new = x[:, committed:e]
            if cc:  # every stored key, then the clean ones up to each query and itself
                mask = process.clean_causal_mask(new, torch.ones_like(x[:, :committed], dtype=torch.bool))
            else:
                mask = torch.cat([torch.ones(e - committed, committed, dtype=torch.bool, device=x.device),
                                  block_causal(blk, blk)], 1)
            out = model(new, attn_mask=mask, cache=cache, store=a - committed)[:, a - committed:]
        else:  # the cache holds the prefix: the block attends to it and to itself (clean-causal: as above)
            view = cache if len(idx) == x.shape[0] else cache.rows(idx)
            new = x[idx, a:e]
            mask = process.clean_causal_mask(new, torch.ones_like(x[idx, :a], dtype=torch.bool)) if cc else None
            out = model(new, cache=view, store=0, attn_mask=mask)
        out = out.float()
        out[..., process.never] = -float("inf")
        return F.log_softmax(out, dim=-1)

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: BlockDiffusion, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        """``steps``: the total step budget, as for the other samplers: each of the ⌈L/S⌉ blocks gets
        max(1, steps // ⌈L/S⌉) denoising steps (and at most that many network calls); with ``threshold`` a block
        takes at most S calls, whatever ``steps``."""
        if self.stop_at_eos and not cond.is_prefix_only():
            raise DiffLMError("--stop-at-eos would pad over the text after a gap: infill without it")
        check_stop_at_eos(self.stop_at_eos, process)
        rows = self.default_rows(cond, rows, steps)
        B, L = cond.shape
        S, m = process.block_size, process.mask_id
        x = cond.initial(m)
        nfe = torch.zeros(B, dtype=torch.long, device=x.device)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        # a backbone without difflm's KV cache (a wrapped Hugging Face model) recomputes the prefix: same tokens
        cache = KVCache(len(model.blocks), capacity=L) if self.cache and getattr(model, "kv_cache", True) else None
        committed = 0
        one_a_call = self.order != "random"
        steps = S if (self.threshold or one_a_call) else max(1, steps // -(-L // S))  # per block
        p_unmask = [float(process.unmask_probability(torch.tensor(k / steps), torch.tensor((k - 1) / steps)))
                    for k in range(steps + 1)]
        for b, a in enumerate(range(0, L, S)):
            e = min(a + S, L)
            logp = torch.zeros(B, e - a, process.vocab_size, device=x.device)
            dirty = torch.ones(B, dtype=torch.bool, device=x.device)
            for k in range(steps, 0, -1):
                masked = (x[:, a:e] == m) & ~done[:, None]
                need = masked.any(-1) & dirty
                if cache is not None and committed < a:  # the previous block goes into the cache now
                    need = ~done
                    call = torch.arange(B, device=x.device)
                else:
                    call = need.nonzero().squeeze(-1)
                if len(call):
                    logp[call] = self._log_probs(model, process, x, a, e, cache, committed, call)
                    nfe += need
                    if cache is not None:  # the fused call (if any) has written [committed, a)
                        committed = a
                key = b * (steps + 1) + k  # each (block, step) draws its own random numbers
                if self.threshold or self.order == "confidence":  # the most confident masked position, and
                    conf = logp.max(-1).values.exp().masked_fill(~masked, -1.0)  # under threshold every one above τ
                    unmask = F.one_hot(conf.argmax(-1), e - a).bool() & masked
                    if self.threshold:
                        unmask |= masked & (conf > self.threshold)
                elif one_a_call:  # left to right: the first masked position
                    unmask = masked & (masked.long().cumsum(-1) == 1)
                else:
                    unmask = masked & (uniform(seed, rows, key, e - a, stream=0) < p_unmask[k])
                if unmask.any():
                    x = x.clone()
                    if self.greedy:
                        x[:, a:e][unmask] = logp[unmask].argmax(-1)
                    else:
                        probs = probs_from_logits(logp[unmask], temperature, top_p)
                        x[:, a:e][unmask] = sample_categorical(probs,
                                                               uniform(seed, rows, key, e - a, stream=1)[unmask])
                dirty = unmask.any(-1)
                if on_step is not None:
                    on_step(StepInfo(k, steps, k / steps, (k - 1) / steps, x, nfe.clone()))
            if self.stop_at_eos:
                eos = (x[:, a:e] == process.eos_id) & ~cond.fixed[:, a:e] & ~done[:, None]
                for r in eos.any(-1).nonzero().squeeze(-1).tolist():
                    x[r, a + int(eos[r].float().argmax()) + 1:] = process.pad_id
                    done[r] = True
                if bool(done.all()):
                    break
        return SampleOutput(x, nfe)
