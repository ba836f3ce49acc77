"""Masked (absorbing-state) diffusion: MDLM (Sahoo et al. 2024, arXiv 2406.07524).

Forward: each token is replaced by [MASK] independently with probability 1 − α(t).
Network: predicts the clean token x0 with the SUBS parameterization (§3.2.3): zero mass on [MASK]
(and [PAD]), and unmasked tokens are carried over unchanged.
Bound, continuous time (eq. 10):  ∫₀¹ −α'(t)/(1−α(t)) · E_q Σ_{i masked} −log p_θ(x0ⁱ | x_t) dt.
Bound, T discrete steps (eq. 8):   Σ_{k=1..T} (α_{s}−α_{t})/(1−α_{t}) · E_q Σ_{i masked} −log p_θ(x0ⁱ | x_t),
with t = k/T, s = (k−1)/T. With α(0)=1 and α(1)=0 the reconstruction and prior terms vanish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffLMError
from ..registry import BackboneNeeds, option, register_family
from ..schedules import Schedule, build_schedule
from .base import T_MIN, Batch, Process

ATTENTION = ("full", "clean-causal", "clean-causal-masks")


@dataclass
class MaskedOptions:
    schedule: str | dict = option("loglinear", "α(t): loglinear, linear, cosine, polynomial, geometric "
                                  "(or a mapping {type: ..., parameters})")
    time_conditioning: bool = option(False, "feed t to the network (adaLN); MDLM's network is time-free")
    discrete_steps: int = option(0, "T > 0: train and evaluate the T-step bound (eq. 8) instead of the continuous one",
                                 ge=0)
    loss: str = option("elbo", "the training loss: elbo (the bound), cmlm (cross-entropy averaged over each row's "
                               "masked tokens, Mask-Predict's objective: lower variance on short targets) or glat "
                               "(cmlm's loss on glancing masks: a first pass over the all-[MASK] row decides how many "
                               "tokens to reveal); evaluation still reports the bound")
    glance_ratio: float = option(0.5, "loss glat: λ, the share of the first pass's wrong tokens revealed", ge=0, le=1)
    glance_mix: float = option(0.0, "loss glat: the share of rows masked at a random rate instead, as loss cmlm masks "
                               "them (glancing alone never trains on the all-[MASK] row that decoding starts from)",
                               ge=0, le=1)
    mask_layout: str = option("random", "loss cmlm: where the masks fall. random: every free position at the drawn "
                              "rate; blocks: the context semi-autoregressive decoding reads (a clean prefix, one block "
                              "of mask_block positions masked at the drawn rate with at least one [MASK], every later "
                              "position [MASK]), the loss on that block only")
    mask_block: int = option(8, "mask_layout blocks: the block's length in positions (the decoder's block)", ge=1)
    attention: str = option("full", "full: every position reads every other (MDLM); clean-causal: a clean position "
                            "reads the clean positions up to itself and a [MASK] those before it and itself, so a "
                            "clean prefix is read as an AR model reads it (XLNet's two streams in one pass): an AR "
                            "parent adapted with model.shift predicts the first [MASK] after a clean prefix as it did; "
                            "clean-causal-masks: the same, and a [MASK] also reads the [MASK]s before it (the masks of "
                            "a block can agree on what they predict; clean positions still never read a [MASK])")
    clean_targets: bool = option(False, "loss cmlm under attention clean-causal with model.shift: also score the clean "
                                 "positions (up to the block's end under mask_layout blocks). There a position's "
                                 "prediction is read off the state before it, which never reads that position, so a "
                                 "clean position is predicted as if it were masked: every target token trains, the "
                                 "clean prefix by the AR parent's own next-token loss")

    @property
    def clean_causal(self) -> bool:
        """Whether a clean position reads only the clean positions up to it (both clean-causal attentions)."""
        return self.attention.startswith("clean-causal")

    def __post_init__(self) -> None:
        if self.clean_targets and (self.loss != "cmlm" or not self.clean_causal):
            raise DiffLMError("process.clean_targets scores clean positions, whose predictions must not read their own "
                              "token: set process.loss cmlm and process.attention clean-causal (and model.shift true)")
        if self.loss not in ("elbo", "cmlm", "glat"):
            raise DiffLMError(f"process.loss must be elbo, cmlm or glat, got {self.loss!r}")
        if self.mask_layout not in ("random", "blocks"):
            raise DiffLMError(f"process.mask_layout must be random or blocks, got {self.mask_layout!r}")
        if self.attention not in ATTENTION:
            raise DiffLMError(f"process.attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.mask_layout == "blocks" and self.loss != "cmlm":
            raise DiffLMError("process.mask_layout blocks changes the forward process, so the bound's weights no "
                              "longer apply: set process.loss cmlm with it")


@register_family
class MaskedDiffusion(Process):
    family = "masked"
    Options = MaskedOptions
    default_sampler = "ancestral"

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, **kw) -> None:
        super().__init__(vocab_size, mask_id, pad_id, bos_id, **kw)
        # SUBS: zero mass on [MASK] (§3.2.3), and on [PAD]/[BOS], which a masked position never holds (``never``)
        o = self.options
        self.schedule = o.schedule if isinstance(o.schedule, Schedule) else build_schedule(o.schedule)
        self.time_conditioning = bool(o.time_conditioning)
        self.discrete_steps = int(o.discrete_steps)

    def backbone_needs(self) -> BackboneNeeds:
        return BackboneNeeds(time_conditioning=self.time_conditioning)

    # -- forward process -------------------------------------------------------------------------
    def times(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Map uniforms u ∈ [0,1) to (t, weight): the time used and the bound's weight at it, both (B,)."""
        u = u.double()
        if self.discrete_steps > 0:
            T = self.discrete_steps
            k = torch.clamp(torch.floor(u * T) + 1, 1, T)
            t, s = k / T, (k - 1) / T
            a_t, a_s = self.schedule.alpha(t), self.schedule.alpha(s)
            return t, T * (a_s - a_t) / (1 - a_t)  # T × one term of eq. 8 (k drawn uniformly)
        t = T_MIN + (1 - T_MIN) * u
        return t, (1 - T_MIN) * -self.schedule.alpha_prime(t) / (1 - self.schedule.alpha(t))

    def corrupt(self, batch: Batch, t: Tensor, generator=None) -> Tensor:
        """Sample x_t ~ q(x_t | x0): mask each free position with probability 1 − α(t). t: (B,) -> (B, L)."""
        x0 = batch.tokens
        masked = batch.rand(generator) < (1 - self.schedule.alpha(t.double()))[:, None]
        if batch.fixed is not None:
            masked &= ~batch.fixed
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0)

    # -- network ---------------------------------------------------------------------------------
    def subs_logits(self, model: nn.Module, xt: Tensor, t: Tensor | None, select: Tensor | None = None,
                    **net) -> Tensor:
        """Network logits in float32 with zero mass on the ids that are never data: (B, L, V), or (N, V)
        at the N positions where ``select`` (B, L) is True; ``net``: more keywords for the network (a KV cache)."""
        tc = t.float() if (self.time_conditioning and t is not None) else None
        if self.options.clean_causal:
            if net.get("cache") is not None and net.get("attn_mask") is None:
                # the mask over (stored, new) keys is the caller's: only the exact prefix cache builds it
                raise DiffLMError("this model reads with process.attention clean-causal, where only the exact prefix "
                                  "cache applies: decode with --kv-cache causal (and --block), or without a cache")
            if net.get("cache") is None:
                net = {**net, "attn_mask": self.clean_causal_mask(xt)}
        logits = (model(xt, tc, **net) if select is None else model(xt, tc, select=select, **net)).float()
        logits[..., self.never] = -math.inf
        return logits

    def clean_causal_mask(self, xt: Tensor, stored: Tensor | None = None) -> Tensor:
        """``attention: clean-causal``'s mask (B, 1, L, L), True = may attend: query i reads key j ≤ i when j is clean
        (not [MASK]), and itself. Clean positions thus never read a [MASK], and with every [MASK] after a clean
        prefix the prefix is computed exactly as by a causal network; under ``clean-causal-masks`` a [MASK] query also
        reads every [MASK] before it. With a KV cache, ``stored`` (B, S) says which
        stored keys each row's queries may read (a clean prefix before them); the mask is then (B, 1, L, S + L),
        the stored keys first, as ``attend`` lays them out."""
        L = xt.shape[1]
        i = torch.arange(L, device=xt.device)
        before = i[None, :] <= i[:, None]  # (L, L): key j at or before query i
        own = torch.eye(L, dtype=torch.bool, device=xt.device)
        mask = ((xt != self.mask_id)[:, None, :] & before[None]) | own[None]
        if self.options.attention == "clean-causal-masks":  # a [MASK] query reads every key up to it
            mask |= (xt == self.mask_id)[:, :, None] & before[None]
        if stored is not None:
            mask = torch.cat([stored[:, None, :].expand(-1, L, -1), mask], -1)
        return mask[:, None]

    def log_probs(self, model: nn.Module, xt: Tensor, t: Tensor | None, select: Tensor | None = None,
                  **net) -> Tensor:
        """SUBS log p_θ(x0 | x_t): (B, L, V) float32, or (N, V) at the N positions where ``select`` (B, L) is
        True (the head and the softmax run only there); [MASK] and [PAD] get −inf, unmasked carry over."""
        logp = F.log_softmax(self.subs_logits(model, xt, t, select, **net), dim=-1)
        cur = xt if select is None else xt[select]
        keep = cur != self.mask_id
        if keep.any():  # carry-over unmasking: a visible token is its own prediction
            onehot = torch.full_like(logp, -math.inf)
            onehot.scatter_(-1, cur.unsqueeze(-1), 0.0)
            logp = torch.where(keep.unsqueeze(-1), onehot, logp)
        return logp

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        x0 = batch.tokens
        t, w = self.times(batch.time_uniforms(generator))
        xt = self.corrupt(batch, t, generator)
        counted = (xt == self.mask_id) & batch.loss_mask  # unmasked positions contribute 0 under SUBS
        nll = F.cross_entropy(self.subs_logits(model, xt, t, select=counted), x0[counted], reduction="none")
        terms = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
        terms[counted] = nll * w.float()[:, None].expand_as(x0)[counted]
        return terms

    def left_to_right_terms(self, model: nn.Module, batch: Batch) -> Tensor:
        """Exact −log p of each modelled token (B, L) under left-to-right decoding one token a call (``confidence`` or
        ``threshold`` with ``--block 1``, drawn at temperature 1), for a time-free ``clean-causal`` model with
        ``model.shift`` (an AR parent adapted that way). When that decoder fills position i, the positions before it
        are clean and i's prediction is read off position i − 1, whose state reads only the clean tokens up to it, so
        one pass over the clean row gives every prediction the decoder makes (teacher forcing); the first position,
        with nothing before it, is predicted by a [MASK] there that reads only itself. Unlike the bound this is the
        likelihood of the distribution that decoder samples from, not of the any-order model."""
        self.check_left_to_right(model)
        x0, counted = batch.tokens, batch.loss_mask
        later = counted.clone()
        later[:, 0] = False
        terms = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
        terms[later] = F.cross_entropy(self.subs_logits(model, x0, None, select=later), x0[later], reduction="none")
        first = counted[:, 0]
        if first.any():  # the first token, from a [MASK] that reads only itself
            logits = self.subs_logits(model, torch.full_like(x0[:, :1], self.mask_id), None)[:, 0]
            terms[first, 0] = F.cross_entropy(logits[first], x0[first, 0], reduction="none")
        return terms

    def check_left_to_right(self, model: nn.Module) -> None:
        """A one-line error unless ``left_to_right_terms`` is exact for this process and network (unshifted, a
        clean position's prediction would read its own token)."""
        cfg = getattr(getattr(model, "module", model), "cfg", None)  # the backbone's, or a source reader's
        if not self.options.clean_causal or self.time_conditioning or not getattr(cfg, "shift", False):
            raise DiffLMError("the left-to-right likelihood is exact only for a time-free masked or block model with "
                              "process.attention clean-causal and model.shift true; evaluate the bound instead")

    def left_to_right_nll(self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """``left_to_right_terms`` summed per sequence with the sequence terms (−log p(length)), in nats: (B,), as
        ``nelbo`` sums the bound's (``generator`` unused: nothing is drawn)."""
        return self.sequence_nats(model, batch, lambda net: self.left_to_right_terms(net, batch))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The bound's terms, or with loss cmlm (Ghazvininejad et al. 2019, §3.1) each masked token's cross-entropy
        times n / m for a row of n modelled tokens of which m are masked: every row weighs its masked tokens' mean
        cross-entropy by its length, whatever its t. The bound's 1/t weight (loglinear) is that ratio's expectation,
        so both aim at the same minimiser; the ELBO's weight swings widely when a short row has one or two masks."""
        if self.options.loss == "elbo":
            return self.bound_terms(model, batch)
        x0 = batch.tokens
        scored = batch.loss_mask  # where a [MASK] carries loss: the block alone under mask_layout blocks
        if self.options.loss == "glat":
            if self.options.glance_mix > 0:  # a share of the rows masked at a random rate, as cmlm masks them
                t_rand, _ = self.times(batch.time_uniforms())
                mixed = batch.rand(stream=2, width=1) < self.options.glance_mix  # (B, 1)
                xt = torch.where(mixed, self.corrupt(batch, t_rand), self.glancing_corrupt(model, batch, ~mixed[:, 0]))
            else:
                xt = self.glancing_corrupt(model, batch)
            # t: the share masked (1 − α(t) = t under loglinear); read only by time-conditioned networks
            t = ((xt == self.mask_id) & batch.loss_mask).sum(-1).double() / batch.loss_mask.sum(-1).clamp_min(1)
        elif self.options.mask_layout == "blocks":
            t, _ = self.times(batch.time_uniforms())
            xt, scored = self.block_corrupt(batch, t)  # the positions after the block are context, as in decoding
        else:
            t, _ = self.times(batch.time_uniforms())
            xt = self.corrupt(batch, t)
        counted = (xt == self.mask_id) & scored
        if self.options.clean_targets:  # every position up to the block's end (the positions after it are [MASK])
            counted = batch.loss_mask & ~((xt == self.mask_id) & ~scored)
            # but not a clean first position: with nothing before it, the shift reads its prediction off its own state
            counted[:, 0] &= xt[:, 0] == self.mask_id
        nll = F.cross_entropy(self.subs_logits(model, xt, t, select=counted), x0[counted], reduction="none")
        scale = batch.loss_mask.sum(-1).float() / counted.sum(-1).clamp_min(1).float()  # n / m per row
        terms = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
        terms[counted] = nll * scale[:, None].expand_as(x0)[counted]
        return terms

    def block_corrupt(self, batch: Batch, t: Tensor) -> tuple[Tensor, Tensor]:
        """The row as semi-autoregressive decoding meets it (LLaDA §2.4; Fast-dLLM v2 trains on the same context):
        free positions are numbered 0..n−1 in each row; a block j of ``mask_block`` of them is drawn uniformly among
        the blocks that reach the text (up to its first [EOS], so the [EOS] fill after it does not dilute the loss);
        the positions before it stay clean, each of its positions is [MASK] with probability 1 − α(t) and at least
        one is, and every position after it is [MASK]. t: (B,) -> x_t (B, L) and the block (B, L) bool."""
        x0, free = batch.tokens, batch.free
        size = self.options.mask_block
        rank = free.long().cumsum(-1) - 1  # each free position's number in its row
        n = free.sum(-1)
        if self.eos_id is not None:  # the text and its first [EOS]: the fill after it is not drawn as a block
            eos = free & (x0 == self.eos_id)
            n = torch.minimum(n, torch.where(eos, rank, n[:, None]).amin(-1) + 1)  # no [EOS]: n + 1, so n stays
        blocks = ((n + size - 1) // size).clamp_min(1)
        start = (torch.floor(batch.rand(stream=3, width=1)[:, 0] * blocks.double()).long() * size)[:, None]
        block = free & (rank >= start) & (rank < start + size)
        r = batch.rand(stream=0)
        drawn = r < (1 - self.schedule.alpha(t.double()))[:, None]
        key = torch.where(block, r, torch.full_like(r, 2.0))
        least = torch.zeros_like(block).scatter_(-1, key.argmin(-1, keepdim=True), True) & block  # ≥ 1 [MASK]
        masked = (block & (drawn | least)) | (free & (rank >= start + size))
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0), block

    @torch.no_grad()
    def first_pass(self, model: nn.Module, batch: Batch, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The network over the rows ``idx`` (n,) of the batch (all B when None) with every free position [MASK]
        (t = 1), as decoding starts: their free positions (n, L) bool, and the logits there (N, V) float32,
        N = free.sum(). An encoder-decoder encodes the sources of those rows only."""
        from ..sampling.base import on_rows  # the samplers import the families

        x0, free = batch.tokens, batch.free
        if idx is not None:
            x0, free, model = x0[idx], free[idx], on_rows(model, idx)
        full = torch.where(free, torch.full_like(x0, self.mask_id), x0)
        t = torch.ones(len(x0), dtype=torch.float64, device=x0.device)
        return free, self.subs_logits(model, full, t, select=free)

    def glancing_corrupt(self, model: nn.Module, batch: Batch, rows: Tensor | None = None) -> Tensor:
        """Glancing sampling (GLAT, Qian et al. 2021, §3.2): the network predicts the row with every free position
        [MASK] (one pass, no gradient); of a row's d wrong predictions, N = ⌊λ·d⌋ free positions chosen at random
        are revealed (their true tokens) and the rest stay [MASK]. A row the model gets wholly wrong is shown much
        of its target, so the decoder learns to predict from the source what it cannot yet guess. (B, L) -> (B, L).
        ``rows`` (B,) bool: glance at these rows only (the first pass runs on them alone); the others come back
        with every free position [MASK]."""
        x0 = batch.tokens
        free = batch.free
        wrong = torch.zeros_like(free)
        idx = None if rows is None else rows.nonzero()[:, 0]
        at = slice(None) if idx is None else idx  # the glanced rows
        if idx is None or len(idx):
            sub_free, logits = self.first_pass(model, batch, idx)
            sub_wrong = torch.zeros_like(sub_free)
            sub_wrong[sub_free] = logits.argmax(-1) != x0[at][sub_free]
            wrong[at] = sub_wrong
        reveal = torch.floor(self.options.glance_ratio * wrong.sum(-1).double()).long()  # N = ⌊λ·d⌋ per row
        key = torch.where(free, batch.rand(stream=1), torch.full(x0.shape, 2.0, dtype=torch.float64,
                                                                  device=x0.device))
        rank = key.argsort(-1).argsort(-1)  # a random order of each row's free positions (they come first)
        return torch.where(free & (rank >= reveal[:, None]), torch.full_like(x0, self.mask_id), x0)

    # -- reverse process -------------------------------------------------------------------------
    def unmask_probability(self, t: Tensor, s: Tensor) -> Tensor:
        """q(x_s ≠ m | x_t = m, x0) = (α_s − α_t)/(1 − α_t) for s < t (MDLM eq. 7), float64."""
        a_t, a_s = self.schedule.alpha(t.double()), self.schedule.alpha(s.double())
        return ((a_s - a_t) / (1 - a_t)).clamp(0.0, 1.0)
