"""Classifier-free guidance (Ho & Salimans 2022) for any family whose network reads the condition as
given tokens (a seq2seq source): the model is trained with the source dropped (replaced by [PAD]) for a
fraction ``train.cond_dropout`` of rows, and at sampling the two predictions are mixed,
    out = (1 + w)·out(x | source) − w·out(x | ∅),
on whatever the network outputs (logits, log-scores, x̂0 embeddings). w = 0 is the conditional model,
w = −1 the unconditional one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.transformer import KVCache


class ClassifierFreeGuidance(nn.Module):
    """Wraps a denoiser. ``source``: (B, L) bool, the positions holding the condition in this batch."""

    def __init__(self, model: nn.Module, source: Tensor, null_id: int, w: float) -> None:
        super().__init__()
        self.model, self.source, self.null_id, self.w = model, source, int(null_id), float(w)
        # what samplers and processes read off the backbone: its config, KV-cache size, token embeddings
        self.cfg, self.blocks, self.embed = model.cfg, model.blocks, model.embed
        self._caches: dict[int, KVCache] = {}

    def rows(self, idx: Tensor) -> ClassifierFreeGuidance:
        """The same guidance for a subset of the batch's rows (samplers that call the network on some rows)."""
        inner = self.model.rows(idx) if callable(getattr(self.model, "rows", None)) else self.model
        return ClassifierFreeGuidance(inner, self.source[idx], self.null_id, self.w)

    def forward(self, x: Tensor, t: Tensor | None = None, attn_mask: Tensor | None = None,
                cache: KVCache | None = None, select: Tensor | None = None, x0_prev: Tensor | None = None,
                positions: Tensor | None = None, store: int | None = None, prev: Tensor | None = None,
                head: str = "token", marks: Tensor | None = None) -> Tensor:
        offset = cache.length if cache is not None else 0
        kw = {"attn_mask": attn_mask, "select": select, "x0_prev": x0_prev, "positions": positions, "store": store,
              "prev": prev} | ({} if head == "token" else {"head": head}) \
            | ({} if marks is None else {"marks": marks})  # DiffusER's tagger reads the aux head, its generator marks
        out = self.model(x, t, cache=cache, **kw)
        if self.w == 0:
            return out
        if positions is None:
            src = self.source[:, offset : offset + x.shape[1]]
        else:  # the call's own row positions ((L,) or (B, L): a window of each row)
            src = self.source.gather(1, positions.expand(x.shape[0], -1))
        null = getattr(self.model, "null", None)
        if callable(null):  # an encoder-decoder: the unconditional stream reads the dropped source
            uncond = null(self.null_id)(x, t, cache=self._ucache(cache), **kw)
            return (1 + self.w) * out - self.w * uncond
        if x.dtype == torch.long:
            xu = torch.where(src, torch.full_like(x, self.null_id), x)
        else:  # embedding diffusion: the given positions hold clean embeddings
            null = self.model.embed.weight[self.null_id].to(x.dtype)
            xu = torch.where(src[..., None], null.expand_as(x), x)
        uncond = self.model(xu, t, cache=self._ucache(cache), **kw)
        return (1 + self.w) * out - self.w * uncond

    def _ucache(self, cache: KVCache | None) -> KVCache | None:
        """The unconditional stream's own KV cache (autoregressive sampling): made with the first call on ``cache``,
        or given beforehand (``pair``)."""
        if cache is None:
            return None
        return self._caches.setdefault(id(cache), KVCache(len(self.model.blocks), cache.capacity))

    def pair(self, cache: KVCache, uncond: KVCache) -> None:
        """Calls on ``cache`` run the unconditional stream on ``uncond`` (a cache kept outside the wrapper)."""
        self._caches[id(cache)] = uncond
