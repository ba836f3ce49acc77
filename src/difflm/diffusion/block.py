"""Block diffusion: BD3-LM (Arriola et al. ICLR 2025, arXiv 2503.09573).

The sequence is cut into blocks of ``block_size`` tokens; blocks are generated left to right, and within a
block tokens are denoised by masked diffusion conditioned on the clean blocks before it:
    −log p(x) ≤ Σ_b  ∫₀¹ −α'(t)/(1−α(t)) · E_q Σ_{i ∈ block b, masked} −log p_θ(x0ⁱ | x_t^b, x0^{<b}) dt   (eq. 8)
with an independent time t_b per block. Block size 1 makes it autoregressive (each term is exactly
−log p(xⁱ | x<ⁱ)); block size L makes it MDLM.

Training runs every block's term in one forward pass over the concatenation [x_t, x0] (length 2L) with the
block-causal mask of §3.2 (Fig. 2): x_t block b sees itself and x0 blocks < b; x0 block b sees x0 blocks ≤ b
(the keys/values that the sampler's KV cache holds). Both halves take RoPE positions 0..L−1. The network is
time-free (as MDLM's; BD3-LM does not condition on t either).

``attention: clean-causal`` keeps an AR parent's view (as the masked family's option of that name): x0 is read
causally, and an x_t position of block b reads x0 blocks < b, the clean x_t positions of its block up to it, and
itself. The bound and the blocks are BD3-LM's; with ``model.shift`` the first [MASK] after a clean prefix is then
predicted exactly as the parent predicts the next token, from the first training step (no annealing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffLMError
from ..registry import BackboneNeeds, option, register_family
from ..schedules import Schedule, build_schedule
from .base import Batch, Process
from .masked import MaskedDiffusion


def block_causal(q_blocks: Tensor, k_blocks: Tensor) -> Tensor:
    """Attention mask (Lq, Lk) bool, True = may attend: a query sees keys of its own block and earlier ones."""
    return k_blocks[None, :] <= q_blocks[:, None]


@dataclass
class BlockOptions:
    block_size: int = option(4, "tokens per block: 1 is autoregressive, data.seq_len is MDLM", ge=1)
    schedule: str | dict = option("loglinear", "α(t) within a block (as process.type masked)")
    clip: list[float] | None = option(None, "[β, ω]: train on t ~ U[β, ω] only (BD3-LM §4 clipped schedule)")
    time_conditioning: bool = option(False, "must stay false: BD3-LM's network is time-free")
    attention: str = option("full", "full: an x_t block reads all of itself and the clean blocks before it (BD3-LM); "
                            "clean-causal: the clean tokens are read causally, and a position of the noisy block "
                            "reads the clean blocks before it, the clean positions of its block up to it and itself, "
                            "so an AR parent adapted with model.shift predicts the first [MASK] after a clean prefix "
                            "as it did (the block sampler's calls and KV cache follow the same mask)")
    clean_targets: bool = option(False, "attention clean-causal with model.shift: the training loss also scores the "
                                 "clean stream x0 by the parent's own next-token loss (each x0 position but the first "
                                 "predicts its token from the clean tokens before it), as the masked family's option "
                                 "of that name scores clean positions; the bound (eval) is BD3-LM's alone")

    @property
    def clean_causal(self) -> bool:
        """Whether clean positions are read causally and a [MASK] reads only the clean positions before it."""
        return self.attention == "clean-causal"

    def __post_init__(self) -> None:
        if self.attention not in ("full", "clean-causal"):
            raise DiffLMError(f"process.attention must be full or clean-causal for block diffusion, "
                              f"got {self.attention!r}")
        if self.clean_targets and not self.clean_causal:
            raise DiffLMError("process.clean_targets scores the clean stream by next-token prediction, which needs "
                              "process.attention: clean-causal (BD3-LM's mask reads a clean block bidirectionally)")


@register_family
class BlockDiffusion(MaskedDiffusion):
    family = "block"
    Options = BlockOptions
    default_sampler = "block"
    generates_length = True  # [EOS] and the padding after it are generated and counted in the terms (_terms)

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, **kw) -> None:
        Process.__init__(self, vocab_size, mask_id, pad_id, bos_id, **kw)  # BlockOptions, not MaskedOptions
        o = self.options
        self.schedule = o.schedule if isinstance(o.schedule, Schedule) else build_schedule(o.schedule)
        self.time_conditioning, self.discrete_steps = False, 0
        if o.time_conditioning:
            raise DiffLMError("block diffusion uses a time-free network (as BD3-LM): "
                              "set process.time_conditioning: false")
        if int(o.block_size) < 1:
            raise DiffLMError(f"process.block_size must be at least 1, got {o.block_size}")
        self.block_size = int(o.block_size)
        if self.length_log_prior is not None:  # padded rows (lines mode): the padding after [EOS] is generated
            self.never = [i for i in self.never if i != pad_id]
        # BD3-LM §4 "clipped" schedules: train on t ~ U[β, ω] only (lower-variance gradients); the bound
        # that ``difflm eval`` reports always integrates over the whole [0, 1]
        clip = o.clip
        if clip is not None and not (len(clip) == 2 and 0 <= clip[0] < clip[1] <= 1):
            raise DiffLMError(f"process.clip must be [beta, omega] with 0 <= beta < omega <= 1, got {clip}")
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))

    def backbone_needs(self) -> BackboneNeeds:
        return BackboneNeeds(attention="block-causal")

    # -- the one-pass training input ---------------------------------------------------------------
    def blocks_of(self, L: int, device=None) -> Tensor:
        """Block index of each position 0..L−1: (L,) long."""
        return torch.arange(L, device=device) // self.block_size

    def training_mask(self, L: int, device=None) -> Tensor:
        """The (2L, 2L) mask over [x_t, x0] (BD3-LM Fig. 2): block-diagonal on x_t, block-causal from x_t to
        earlier x0 blocks, block-causal on x0, and x0 never sees x_t."""
        blk = self.blocks_of(L, device)
        tt = blk[:, None] == blk[None, :]
        t0 = blk[None, :] < blk[:, None]
        return torch.cat([torch.cat([tt, t0], 1), torch.cat([torch.zeros_like(tt), block_causal(blk, blk)], 1)], 0)

    def clean_causal_training_mask(self, xt: Tensor) -> Tensor:
        """``attention: clean-causal``'s mask over [x_t, x0] (B, 1, 2L, 2L): an x_t query of block b reads x0 blocks
        < b and, in its own block, the clean x_t keys up to it and itself (``clean_causal_mask`` within the block);
        x0 is read causally (the parent's view, and the keys the sampler's cache holds); x0 never sees x_t."""
        B, L = xt.shape
        blk = self.blocks_of(L, xt.device)
        same = blk[:, None] == blk[None, :]
        tt = self.clean_causal_mask(xt)[:, 0] & same[None]
        t0 = (blk[None, :] < blk[:, None]).expand(B, L, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=xt.device).tril().expand(B, L, L)
        return torch.cat([torch.cat([tt, t0], -1), torch.cat([torch.zeros_like(tt), causal], -1)], 1)[:, None]

    def preceding(self, L: int, device=None) -> Tensor:
        """For each of the 2L positions of [x_t, x0], the one holding its preceding token as the network should
        read it (a shifted backbone predicts token i from there): inside a block the previous x_t position, for
        a block's first token the clean x0 copy of the token before it (what sampling sees). (2L,) long."""
        j = torch.arange(L, device=device)
        in_xt = torch.where((j % self.block_size == 0) & (j > 0), L + j - 1, j - 1)
        return torch.cat([in_xt, L + j - 1])

    def denoiser_logits(self, model: nn.Module, xt: Tensor, x0: Tensor, select: Tensor | None = None,
                        clean_select: Tensor | None = None) -> Tensor:
        """Logits of x0 at the x_t positions given x_t's block and the clean earlier blocks, all blocks in one
        pass: (B, L, V) float32, or (N, V) at the N positions where ``select`` (B, L) is True. ``clean_select``
        (B, L), with ``select``: also the outputs at those positions of the clean stream x0 (under clean-causal
        attention with model.shift, position j's next-token prediction of x0ʲ from x0^{<j}); the N rows then follow
        ``torch.cat([select, clean_select], 1)`` in row-major order."""
        B, L = xt.shape
        pos = torch.arange(L, device=xt.device)
        sel = None if select is None else torch.cat(
            [select, torch.zeros_like(select) if clean_select is None else clean_select], 1)
        mask = self.clean_causal_training_mask(xt) if self.options.clean_causal else self.training_mask(L, xt.device)
        out = model(torch.cat([xt, x0], 1), attn_mask=mask,
                    positions=torch.cat([pos, pos]), select=sel, prev=self.preceding(L, xt.device)).float()
        if select is None:
            out = out[:, :L]
        out[..., self.never] = -float("inf")
        return out

    # -- bound -------------------------------------------------------------------------------------
    def _terms(self, model: nn.Module, batch: Batch, generator, clip: tuple[float, float] | None,
               clean_targets: bool = False) -> Tensor:
        x0 = batch.tokens
        B, L = x0.shape
        if L % self.block_size:
            raise DiffLMError(
                f"data.seq_len={L} is not a multiple of process.block_size={self.block_size}; change one of them"
            )
        nb = L // self.block_size
        # one uniform per row, spread over its blocks: t_b = (u + b/nb) mod 1 (each t_b uniform; stratified)
        u = (batch.time_uniforms(generator)[:, None] + torch.arange(nb, device=x0.device) / nb) % 1.0
        if clip is None:
            t, w = self.times(u)
        else:
            t = clip[0] + (clip[1] - clip[0]) * u.double()
            w = -self.schedule.alpha_prime(t) / (1 - self.schedule.alpha(t))
        t = t.repeat_interleave(self.block_size, dim=1)  # (B, L)
        w = w.repeat_interleave(self.block_size, dim=1)
        # every modelled position is noised, [EOS] included (in lines mode too: the length is generated, not
        # drawn from a prior), and so is the padding after [EOS]: the sampler generates it like any token, so
        # the model learns it (its terms tend to 0: a bound on −log p(x, padding) = −log p(x), counted over
        # the text's tokens only)
        modelled = batch.loss_mask | (x0 == self.pad_id)
        masked = (batch.rand(generator) < 1 - self.schedule.alpha(t)) & modelled
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        # with clean_targets, also the clean stream's next-token terms −log p(x0ʲ | x0^{<j}) at every text position but
        # the first (a shifted network reads position 0's prediction off the state before it, x_t's last): same pass
        ar = batch.loss_mask.clone() if clean_targets else torch.zeros_like(masked)
        ar[:, 0] = False
        both = torch.cat([masked, ar], 1)
        nll = F.cross_entropy(self.denoiser_logits(model, xt, x0, select=masked, clean_select=ar),
                              torch.cat([x0, x0], 1)[both], reduction="none")
        terms = torch.zeros((B, 2 * L), dtype=torch.float32, device=x0.device)
        terms[both] = nll * torch.cat([w, torch.ones_like(w)], 1)[both].float()  # clean x_t: 0 (SUBS carry-over)
        return terms[:, :L] + terms[:, L:]

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        return self._terms(model, batch, generator, None)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The bound's terms (over ``process.clip``'s times when set), plus with ``clean_targets`` the clean stream's
        next-token terms at the same positions (B, L)."""
        return self._terms(model, batch, None, self.clip, self.options.clean_targets)
