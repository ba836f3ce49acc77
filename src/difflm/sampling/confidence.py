"""Confidence-ordered decoding for masked models (not samplers of the model's distribution: heuristics that
trade fidelity for fewer network calls, as in MaskGIT, LLaDA and Fast-dLLM).

confidence  MaskGIT / LLaDA low-confidence remasking (LLaDA §2.4, Alg. 5): at each of ``steps`` steps every
            masked candidate draws a token from x̂0; the k most confident keep it and the rest stay masked,
            k spreading the candidates evenly over the steps left. Scores: ``confidence`` (probability of
            the drawn token), ``margin`` (top-1 minus top-2 probability), ``entropy`` (−H of x̂0).
threshold   Fast-dLLM parallel decoding (arXiv 2505.22618, §3.3): each call unmasks every candidate whose
            score exceeds τ, and at least the best one; ``steps`` is ignored, calls ≤ tokens to fill.
Both take ``block`` (0 = whole sequence): semi-autoregressive order, candidates only in the leftmost block
that still has a masked position (LLaDA's block length). Blocks are counted from each row's first free
position (after its prompt or source, as LLaDA splits the generation length); with ``confidence`` a row's
steps are split evenly across its blocks. ``greedy`` takes each candidate's argmax (LLaDA's temperature 0)
instead of drawing it. ``stop_at_eos`` ends a row once it has an [EOS] with nothing masked before it (its
text can no longer change), and ``kv_cache`` reuses keys and values across a block's calls (Fast-dLLM §3.2,
``BlockCache``: an approximation, exact only where no stored key depends on what changed); for a model with
``process.attention: clean-causal`` the cache ``causal`` is exact (``CausalCache``: a finished clean prefix's keys
never change, so each call computes only the positions from the last stored one through the block, as AR decoding
with a KV cache does). Draws are keyed on (seed, row, call), so a row's text does not depend on the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..diffusion.masked import MaskedDiffusion
from ..errors import DiffLMError
from ..models.transformer import KVCache
from ..registry import option, register_sampler
from ..rng import seed_rows, uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo, check_stop_at_eos, on_rows
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning
from .guidance import ClassifierFreeGuidance

SCORES = ("confidence", "margin", "entropy")
CACHES = ("none", "prefix", "dual", "causal")


def ranks(score: Tensor, *, descending: bool) -> Tensor:
    """Each position's rank within its row by ``score`` (B, L) -> (B, L) long, 0 first; ties by position."""
    order = torch.sort(score, dim=-1, descending=descending, stable=True).indices
    pos = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


@dataclass
class ConfidenceOptions:
    score: Literal["confidence", "margin", "entropy"] = option(
        "confidence", "how sure a drawn token is: its probability, top-1 minus top-2, or −entropy")
    block: int = option(0, "semi-autoregressive block length (0 = the whole sequence)", ge=0)
    greedy: bool = option(False, "take each candidate's most probable token instead of drawing one (temperature 0; "
                                 "the score is still the model's probability)")
    kv_cache: Literal["none", "prefix", "dual", "causal"] = option(
        "none", "Fast-dLLM's approximate KV cache (with --block): keys/values computed when a row enters a block and "
                "reused within it; prefix: those before the block, dual: those after it too; causal: the exact cache "
                "of a process.attention clean-causal model (the finished prefix's keys, computed once)")
    stop_at_eos: bool = option(False, "end a row once it has an [EOS] with nothing masked before it: the masks after "
                                      "it become [PAD] (the text up to the [EOS] is what it would have been)")

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise DiffLMError(f"unknown confidence score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.block < 0:
            raise DiffLMError("--block must be ≥ 0 (0 = the whole sequence)")
        if self.kv_cache not in CACHES:
            raise DiffLMError(f"unknown --kv-cache {self.kv_cache!r}; choose one of {', '.join(CACHES)}")
        if self.kv_cache in ("prefix", "dual") and not self.block:
            raise DiffLMError("--kv-cache caches the positions outside the current block: give --block > 0")


@dataclass
class ThresholdOptions(ConfidenceOptions):
    threshold: float = option(0.9, "unmask every candidate whose score exceeds τ (and at least the best one)")


def check_kv_cache(model: nn.Module) -> None:
    """A one-line error unless the network keeps difflm's KV cache (its ``blocks`` read and write one)."""
    if not getattr(model, "kv_cache", True) or not hasattr(model, "blocks"):
        raise DiffLMError("this network keeps no difflm KV cache (a wrapped Hugging Face model?): drop --kv-cache")


class BlockCache:
    """Fast-dLLM's approximate KV cache for blockwise decoding (arXiv 2505.22618, §3.2: prefix cache and
    DualCache). When a row enters a new block, one call over the whole row computes its predictions and stores
    every position's keys and values. The calls within the block recompute only a window: the block and one
    position before it (whose state predicts the block's first token in a shifted backbone) with ``dual``, the
    block and everything after it with ``prefix``; the window attends to its own fresh keys and to the stored
    keys elsewhere (the stored keys of the window's positions, stale, are masked out). Outside the window the
    keys are those of the row as it stood when the block began: the approximation Fast-dLLM measures."""

    def __init__(self, mode: str, n_layer: int, block: int, rows: int) -> None:
        self.mode, self.block, self.rows = mode, block, rows
        self.kv = KVCache(n_layer)  # (B, H, L, Dh) per layer, every row's whole row
        self.ukv = KVCache(n_layer)  # the same for guidance's unconditional stream

    def _views(self, model: nn.Module, idx: Tensor | slice | None,
               length: int | None = None) -> tuple[KVCache, KVCache | None]:
        """The caches a call reads and writes: rows ``idx`` of the stored ones (None: fresh ones; ``length``: their
        first positions only), the first the network's, the second (under guidance, paired with the first; else
        None) the unconditional stream's."""
        n = len(self.kv.k)
        view = KVCache(n) if idx is None else self.kv.rows(idx, length)
        if not isinstance(model, ClassifierFreeGuidance):
            return view, None
        uncond = KVCache(n) if idx is None else self.ukv.rows(idx, length)
        model.pair(view, uncond)
        return view, uncond

    def refresh(self, model: nn.Module, process: MaskedDiffusion, x: Tensor, t: Tensor, idx: Tensor,
                select: Tensor) -> Tensor:
        """log p_θ(x0 | x_t) at ``select`` of rows ``idx`` (x: their (n, L) tokens) by a call over the whole rows,
        whose keys and values are stored as these rows' cache: (N, V)."""
        fresh, ufresh = self._views(model, None)
        logp = process.log_probs(model, x, t, select=select, cache=fresh)
        for new, store in ((fresh, self.kv), (ufresh, self.ukv)):
            if new is None:
                continue
            for i, (k, v) in enumerate(zip(new.k, new.v)):
                if store.k[i] is None:
                    store.k[i] = k.new_zeros((self.rows, *k.shape[1:]))
                    store.v[i] = v.new_zeros((self.rows, *v.shape[1:]))
                store.k[i][idx], store.v[i][idx] = k, v
        return logp

    def window(self, model: nn.Module, process: MaskedDiffusion, x: Tensor, t: Tensor, idx: Tensor, select: Tensor,
               start: Tensor) -> Tensor:
        """log p_θ(x0 | x_t) at ``select`` of rows ``idx`` (x: their (n, L) tokens; every selected position inside
        its row's block, which begins at ``start`` (n,)) from a call on each row's window: (N, V)."""
        n, L = x.shape
        if self.mode == "dual":
            W = min(self.block + 1, L)
            ws = (start - 1).clamp(0, L - W)
        else:
            ws = (start - 1).clamp_min(0).amin().expand(n)
            W = L - int(ws[0])
        pos = ws[:, None] + torch.arange(W, device=x.device)  # (n, W) each row's window
        sel = select.gather(1, pos)
        assert int(sel.sum()) == int(select.sum()), "a selected position lies outside its row's window"
        inside = torch.zeros(n, L, dtype=torch.bool, device=x.device).scatter_(1, pos, True)
        keys = torch.cat([~inside, torch.ones(n, W, dtype=torch.bool, device=x.device)], 1)  # stale keys out
        # no stored last state (``KVCache.last``): a window at position 0 keeps its own state there, as the
        # whole-row call does
        return process.log_probs(model, x.gather(1, pos), t, select=sel, cache=self._views(model, idx)[0], store=0,
                                 positions=pos, attn_mask=keys[:, None, None, :].expand(-1, 1, W, -1))


class CausalCache(BlockCache):
    """The exact KV cache of a ``process.attention: clean-causal`` model. A clean position whose every predecessor
    is clean reads only them and itself, so once a row's prefix is settled its keys and values are final: each is
    computed once, stored, and read by every later call. A call runs on a window from the last stored position
    (its fresh state predicts the next token in a shifted backbone, as ``BlockCache.window``'s dual window does)
    through the candidates, under the clean-causal mask over the stored prefix and the window; the window's
    positions that were clean with a clean prefix at the call are then stored. Decoding token by token (blocks of
    1) thus costs what AR decoding with a KV cache costs: a few positions a call, not the whole row."""

    def __init__(self, n_layer: int, rows: int, device: torch.device) -> None:
        super().__init__("causal", n_layer, 0, rows)
        self.done = torch.zeros(rows, dtype=torch.long, device=device)  # per row: positions stored (a clean prefix)

    def call(self, model: nn.Module, process: MaskedDiffusion, x: Tensor, t: Tensor, idx: Tensor,
             select: Tensor, settled: Tensor | None = None, raw: bool = False) -> Tensor:
        """log p_θ(x0 | x_t) at ``select`` (n, L) of rows ``idx`` (x: their (n, L) tokens): (N, V); the keys of the
        window's settled prefix positions are stored for the next calls. ``settled`` (n,): how much of each row's
        clean prefix is final (default: all of it; less where clean tokens are only proposals); ``raw``: the
        network's SUBS logits, also at clean positions (no carry-over), instead of log-probabilities."""
        n, L = x.shape
        pos_l = torch.arange(L, device=x.device)
        masked = x == process.mask_id
        if settled is None:
            settled = torch.where(masked.any(-1), masked.long().argmax(-1), L)  # the clean prefix's length now
        end = torch.where(select.any(-1), (select * pos_l).amax(-1) + 1, settled)  # past the last candidate
        ws = (self.done[idx] - 1).clamp_min(0)
        W = max(int((end - ws).max()), 1)
        ws = ws.clamp(max=L - W)
        pos = ws[:, None] + torch.arange(W, device=x.device)  # (n, W) each row's window
        sel = select.gather(1, pos)
        assert int(sel.sum()) == int(select.sum()), "a selected position lies outside its row's window"
        stored = self.kv.k[0] is not None
        S = int(ws.max())  # the stored keys read: each row's before its window (a clean prefix), none past them
        keys = (pos_l[None, :S] < ws[:, None]) if stored else None
        every = len(idx) == self.rows and bool((idx == torch.arange(self.rows, device=idx.device)).all())
        view, uview = self._views(model, (slice(None) if every else idx) if stored else None, S)  # all: no copy
        logp = (process.subs_logits if raw else process.log_probs)(
            model, x.gather(1, pos), t, select=sel, cache=view, positions=pos,
            attn_mask=process.clean_causal_mask(x.gather(1, pos), keys))
        keep = pos < settled[:, None]  # (n, W): window positions now part of the settled prefix
        r, c = idx[:, None].expand(n, W)[keep], pos[keep]
        for new, store in ((view, self.kv), (uview, self.ukv)):
            if new is None:
                continue
            for i, (k, v) in enumerate(zip(new.k, new.v)):
                k, v = k[..., -W:, :], v[..., -W:, :]  # this call's keys (after the stored ones)
                if store.k[i] is None:
                    store.k[i] = k.new_zeros((self.rows, k.shape[1], L, k.shape[-1]))
                    store.v[i] = v.new_zeros((self.rows, v.shape[1], L, v.shape[-1]))
                store.k[i][r, :, c] = k.transpose(1, 2)[keep]
                store.v[i][r, :, c] = v.transpose(1, 2)[keep]
        self.done[idx] = torch.maximum(self.done[idx], settled)
        return logp

    def reorder(self, origin: Tensor) -> None:
        """Row r now holds what row ``origin[r]`` held (B,): beam search's surviving hypotheses take their stored
        prefixes with them."""
        S = int(self.done.max())  # past every row's stored prefix nothing is read: it need not move
        for store in (self.kv, self.ukv):
            for kv in (store.k, store.v):
                for t in kv:
                    if t is not None:
                        t[:, :, :S] = t[origin, :, :S]
        self.done = self.done[origin]


@register_sampler
class ConfidenceDecoding(Sampler):
    name = "confidence"
    families = ("masked",)
    Options = ConfidenceOptions

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.score, self.block = self.options.score, int(self.options.block)

    def _keep(self, cand: Tensor, score: Tensor, rank: Tensor, calls_left: Tensor) -> Tensor:
        """Which candidates keep their drawn token (B, L): an even share of the steps left, best first."""
        return cand & (rank < self._count(cand, calls_left)[:, None])

    def _candidates(self, masked: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
        """The masked positions of each row's leftmost block that still has one (B, L) bool, and that
        block's index (B,); blocks start at each row's first free position ``start`` (B,)."""
        if not self.block:
            return masked, torch.zeros(masked.shape[0], dtype=torch.long, device=masked.device)
        L = masked.shape[1]
        blk = (torch.arange(L, device=masked.device)[None] - start[:, None]).clamp_min(0) // self.block  # (B, L)
        first = torch.where(masked, blk, torch.full_like(blk, 1 << 30)).amin(-1)  # (B,)
        return masked & (blk == first[:, None]), first

    def _block_cache(self, model: nn.Module, process: MaskedDiffusion, B: int,
                     device: torch.device) -> BlockCache | None:
        """The KV cache ``kv_cache`` asks for (None: every call over the whole rows): Fast-dLLM's approximate one,
        or a clean-causal model's exact one, after checking the options against the network and the process."""
        check_stop_at_eos(self.options.stop_at_eos, process)
        mode = self.options.kv_cache
        if mode == "none":
            return None
        check_kv_cache(model)
        causal = getattr(process.options, "clean_causal", False)
        if causal and mode != "causal":
            raise DiffLMError(f"--kv-cache {mode} keeps keys computed under full attention; this model reads with "
                              "process.attention clean-causal: use --kv-cache causal (exact)")
        if mode == "causal":
            if not causal:
                raise DiffLMError("--kv-cache causal is exact only for a model with process.attention clean-causal; "
                                  "this one attends fully: use --kv-cache prefix or dual (approximate)")
            return CausalCache(len(model.blocks), B, device)
        return BlockCache(mode, len(model.blocks), self.block, B)

    @staticmethod
    def _end_rows(x: Tensor, fixed: Tensor, process: MaskedDiffusion) -> Tensor:
        """x (B, L) with the masks after each row's first generated [EOS] set to [PAD] where nothing before that
        [EOS] is still masked: no later call could change the row's text up to it."""
        eos = (x == process.eos_id) & ~fixed
        L = x.shape[1]
        first = torch.where(eos.any(-1), eos.long().argmax(-1), L)[:, None]  # (B, 1)
        pos = torch.arange(L, device=x.device)[None]
        settled = ~((x == process.mask_id) & (pos < first)).any(-1, keepdim=True)
        tail = settled & (pos > first) & (x == process.mask_id)
        return torch.where(tail, torch.full_like(x, process.pad_id), x) if tail.any() else x

    def _scores(self, probs: Tensor, tok: Tensor) -> Tensor:
        """(N,) float64 scores of the N drawn tokens from their distributions (N, V)."""
        if self.score == "confidence":
            return probs.gather(-1, tok[:, None])[:, 0]
        if self.score == "margin":
            top = probs.topk(2, dim=-1).values
            return top[:, 0] - top[:, 1]
        return (probs * torch.log(probs.clamp_min(1e-300))).sum(-1)  # −H

    def _count(self, cand: Tensor, calls_left: Tensor) -> Tensor:
        """How many candidates each row unmasks now (B,): an even share of the steps left."""
        n = cand.sum(-1)
        return torch.where(n > 0, torch.ceil(n / calls_left.clamp_min(1)).long().clamp_min(1), 0)

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: MaskedDiffusion, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        rows = self.default_rows(cond, rows, steps)
        B, L = cond.shape
        m = process.mask_id
        x = cond.initial(m)
        nfe = torch.zeros(B, dtype=torch.long, device=x.device)
        free0 = (~cond.fixed).sum(-1)
        start = (~cond.fixed).long().argmax(-1)  # each row's first free position, where its blocks begin
        span = (L - start).clamp_min(1)
        n_blocks = torch.ones_like(span) if not self.block else torch.div(span + self.block - 1, self.block,
                                                                            rounding_mode="floor")
        per_block = torch.div(steps, n_blocks, rounding_mode="floor").clamp_min(1)  # (B,) calls per block
        cur_block = torch.full((B,), -1, dtype=torch.long, device=x.device)
        spent = torch.zeros(B, dtype=torch.long, device=x.device)  # calls spent on the current block
        kv = self._block_cache(model, process, B, x.device)
        call = 0
        while (x == m).any():
            masked = x == m
            live = masked.any(-1)
            idx = live.nonzero().squeeze(-1)
            cand, blk = self._candidates(masked[idx], start[idx])
            moved = blk != cur_block[idx]
            spent[idx] = torch.where(moved, 0, spent[idx])
            cur_block[idx] = blk
            t = (masked[idx].sum(-1).double() / free0[idx].clamp_min(1).double()).float()  # masked fraction
            if kv is None:
                logp = process.log_probs(on_rows(model, idx), x[idx], t, select=cand)  # x̂0 at the candidates: (N, V)
            elif isinstance(kv, CausalCache):
                logp = kv.call(on_rows(model, idx), process, x[idx], t, idx, cand)
            else:  # rows entering a block refresh their cache, the others read it
                logp = torch.empty(int(cand.sum()), process.vocab_size, device=x.device)
                owner = torch.repeat_interleave(moved, cand.sum(-1))  # (N,) each candidate's row entered a block
                if moved.any():
                    r = idx[moved]
                    logp[owner] = kv.refresh(on_rows(model, r), process, x[r], t[moved], r, cand[moved])
                if not moved.all():
                    r, stay = idx[~moved], ~moved
                    logp[~owner] = kv.window(on_rows(model, r), process, x[r], t[stay], r, cand[stay],
                                             start[r] + blk[stay] * self.block)
            nfe[idx] += 1
            if self.options.greedy:
                probs = probs_from_logits(logp)
                tok = probs.argmax(-1)
            else:
                probs = probs_from_logits(logp, temperature, top_p)
                tok = sample_categorical(probs, uniform(seed_rows(seed, idx), rows[idx], call, L, stream=6)[cand])
            score = torch.full(cand.shape, -math.inf, dtype=torch.float64, device=x.device)
            score[cand] = self._scores(probs, tok)
            drawn = torch.full_like(x[idx], m)
            drawn[cand] = tok
            rank = ranks(score, descending=True)  # of each candidate within its row (0 = best)
            keep = self._keep(cand, score, rank, per_block[idx] - spent[idx])
            spent[idx] += 1
            x = x.clone()
            sub = x[idx]
            sub[keep] = drawn[keep]
            x[idx] = sub
            if self.options.stop_at_eos:
                x = self._end_rows(x, cond.fixed, process)
            call += 1
            if on_step is not None:
                on_step(StepInfo(max(steps - call, 0), steps, 1.0, 0.0, x, nfe.clone()))
        return SampleOutput(x, nfe)


@register_sampler
class ThresholdDecoding(ConfidenceDecoding):
    name = "threshold"
    Options = ThresholdOptions
    bench = ({"threshold": 0.9}, {"threshold": 0.9, "block": 8, "greedy": True},  # semi-AR, then with the cache
             {"threshold": 0.9, "block": 8, "greedy": True, "kv_cache": "dual"})
    step_free = True

    def _keep(self, cand: Tensor, score: Tensor, rank: Tensor, calls_left: Tensor) -> Tensor:
        """Every candidate above τ, and at least the best one."""
        return cand & ((score > self.options.threshold) | (rank == 0))


@dataclass
class MaskPredictOptions:
    draw: bool = option(False, "draw each token from x̂0 (keyed on seed, row, iteration) instead of Mask-Predict's "
                               "argmax")
    start: int = option(0, "begin at iteration s from the draft held in the free positions (AR bootstrap); 0 = "
                           "from all masks", ge=0)

    def __post_init__(self) -> None:
        if self.start < 0:
            raise DiffLMError("--start must be ≥ 0 (0 = decode from all masks)")


@register_sampler
class MaskPredict(Sampler):
    """Mask-Predict (Ghazvininejad et al. 2019, §3.2): T = ``steps`` iterations over the N free positions of a row.
    Iteration 0 predicts every position; iteration t re-masks the n = ⌊N·(T−t)/T⌋ positions of lowest probability
    — among all of them, decoded ones included, so an early mistake can be undone — and predicts those again, each
    keeping the probability it had when last predicted. T = 1 is one-shot argmax. ``draw`` draws the tokens from x̂0
    (keyed on (seed, row, iteration)) instead of taking the argmax.

    ``start`` s > 0 refines a draft (DiffusER's AR bootstrap, §3.3, for a masked model): the free positions hold
    another model's output; one pass with all of them masked gives each draft token the probability iteration 0
    would have given it, the n_s least probable are re-masked, and iterations s … T−1 run as above (NFE 1 + T − s)."""

    name = "mask-predict"
    families = ("masked",)
    Options = MaskPredictOptions

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: MaskedDiffusion, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        rows = self.default_rows(cond, rows, steps)
        B, L = cond.shape
        m = process.mask_id
        x = cond.initial(m)
        free = ~cond.fixed
        N = free.sum(-1)
        p = torch.zeros(B, L, dtype=torch.float64, device=x.device)  # probability of each position's token
        nfe = torch.zeros(B, dtype=torch.long, device=x.device)
        s = self.options.start
        if s >= steps:
            raise DiffLMError(f"--start {s} leaves no iteration of {steps}: give a start below --steps")
        if s > 0:  # the draft, scored as iteration 0 would have predicted it, its n_s least probable re-masked
            masked = x == m
            t = torch.ones(B, device=x.device)
            probs = probs_from_logits(process.log_probs(model, x, t, select=masked), temperature, top_p)
            nfe += 1
            x = torch.where(free, cond.tokens, x)
            p[masked] = probs.gather(-1, x[masked][:, None])[:, 0].double()
            n = torch.div(N * (steps - s), steps, rounding_mode="floor")
            rank = ranks(torch.where(free, p, torch.full_like(p, math.inf)), descending=False)
            x[free & (rank < n[:, None])] = m
        for it in range(s, steps):
            masked = x == m
            t = (masked.sum(-1).double() / N.clamp_min(1).double()).float()  # the masked fraction
            logp = process.log_probs(model, x, t, select=masked)  # (K, V) at the masked positions
            nfe += 1
            probs = probs_from_logits(logp, temperature, top_p)
            if self.options.draw:
                tok = sample_categorical(probs, uniform(seed, rows, it, L, stream=8)[masked])
            else:
                tok = probs.argmax(-1)
            x = x.clone()
            x[masked] = tok
            p[masked] = probs.gather(-1, tok[:, None])[:, 0]
            if it + 1 < steps:  # re-mask the n least probable free positions of each row
                n = torch.div(N * (steps - 1 - it), steps, rounding_mode="floor")
                rank = ranks(torch.where(free, p, torch.full_like(p, math.inf)), descending=False)
                x[free & (rank < n[:, None])] = m
            if on_step is not None:
                on_step(StepInfo(steps - it, steps, float(steps - it) / steps, float(steps - it - 1) / steps, x,
                                 nfe.clone()))
        return SampleOutput(x, nfe)
