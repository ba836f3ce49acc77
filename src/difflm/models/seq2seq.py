"""Encoder-decoder seq2seq (CMLM / Mask-Predict, DiffuSeq-v2): the network reads the source through an encoder.

Rows keep the pairs layout every family and sampler knows (source, [BOS], target, [EOS]…; the source fixed); a
``SourceReader`` hands the backbone the encoded source of each row (``Transformer.encode``) and the decoder reads
only the target, numbered from 0 at its [BOS], plus the source by cross-attention. Processes, samplers and the
trainer call the reader like the network itself (``bind_source`` wraps a network for a batch of rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.datasets import source_mask, target_lengths
from ..errors import DiffLMError
from .transformer import Memory


def reads_source(model: nn.Module) -> bool:
    """Whether ``model`` (or the network inside a DDP or guidance wrapper) is an encoder-decoder."""
    net = getattr(model, "module", model)
    return getattr(getattr(net, "cfg", None), "encoder_layers", 0) > 0


class SourceReader(nn.Module):
    """``model`` called with each row's encoded source: ``source`` (B, S) left-aligned, ``mask`` (B, S) True at
    real source positions, ``start`` (B,) where each row's target begins in the network's input; or, captioning,
    ``images`` (B, C, H, W) that the image encoder reads instead. The source is encoded once per reader, or at
    every call while training (so gradients reach the encoder)."""

    def __init__(self, model: nn.Module, source: Tensor, mask: Tensor, start: Tensor,
                 memory: Memory | None = None, images: Tensor | None = None) -> None:
        super().__init__()
        self.model, self.source, self.mask, self.start, self._memory = model, source, mask, start, memory
        self.images = images
        self._null: SourceReader | None = None  # the unconditional stream (``null``), built once
        self._trained: Memory | None = None
        net = getattr(model, "module", model)  # what samplers and processes read off the backbone
        self.cfg, self.blocks, self.embed = net.cfg, net.blocks, net.embed

    @classmethod
    def for_rows(cls, model: nn.Module, tokens: Tensor, bos_id: int, shift: int = 0) -> SourceReader:
        """The reader for rows ``tokens`` (B, L) in pairs layout (the source before the first [BOS]); ``shift``:
        how far the family's network input lies right of the rows (1 for the autoregressive baseline)."""
        n = source_mask(tokens, bos_id).sum(-1) - 1  # source length: the positions before the [BOS]
        S = max(int(n.max()), 1) if len(n) else 1
        mask = torch.arange(S, device=tokens.device)[None, :] < n[:, None]
        return cls(model, tokens[:, :S], mask, n + shift)

    @classmethod
    def for_images(cls, model: nn.Module, tokens: Tensor, images: Tensor, bos_id: int, shift: int = 0) -> SourceReader:
        """The reader for caption rows ``tokens`` (B, L) ([BOS], caption, [EOS]…) describing ``images``."""
        reader = cls.for_rows(model, tokens, bos_id, shift)
        reader.images = images
        return reader

    def rows(self, idx: Tensor) -> SourceReader:
        """The reader for a subset of the rows (samplers that call the network on some rows): the batch's sources
        are encoded once, here if not yet, and every subset reads its rows of that encoding."""
        images = None if self.images is None else self.images[idx]
        # while training nothing is cached for the batch (a subset then encodes its own rows: glancing's first pass)
        memory = None if self._memory is None and self.model.training else self.memory().rows(idx)
        reader = SourceReader(self.model, self.source[idx], self.mask[idx], self.start[idx], memory, images)
        if self._null is not None:
            reader._null = self._null.rows(idx)
        return reader

    def null(self, null_id: int) -> SourceReader:
        """The same rows with the source dropped (every source token [PAD], or a blank image, as
        ``train.cond_dropout`` trains it): classifier-free guidance's unconditional stream, built (and its dropped
        source encoded) once per reader."""
        if self._null is None:
            if self.images is not None:
                self._null = SourceReader(self.model, self.source, self.mask, self.start,
                                          images=torch.zeros_like(self.images))
            else:
                src = torch.where(self.mask, torch.full_like(self.source, null_id), self.source)
                self._null = SourceReader(self.model, src, self.mask, self.start)
        return self._null

    def _encode(self) -> Memory:
        net = getattr(self.model, "module", self.model)
        if self.images is not None:
            return net.encode_image(self.images, self.start)
        return net.encode(self.source, self.mask, self.start)

    def memory(self) -> Memory:
        if self.model.training and torch.is_grad_enabled():
            self._trained = self._encode()  # the last encoding with gradients: the auxiliary losses read it too
            return self._trained
        if self._memory is None:
            self._memory = self._encode()
        return self._memory

    def forward(self, x: Tensor, t: Tensor | None = None, **kw) -> Tensor:
        return self.model(x, t, memory=self.memory(), **kw)

    @property
    def predicts_length(self) -> bool:
        """Whether the encoder predicts the target length (data.target_length predicted)."""
        return getattr(self.cfg, "length_classes", 0) > 0

    def length_log_probs(self) -> Tensor:
        """log p(ℓ | source) over target lengths ℓ = 0..C−1: (B, C) float32."""
        return F.log_softmax(self.memory().length_logits, dim=-1)

    def length_nll(self, lengths: Tensor) -> Tensor:
        """−log p(ℓ | source) of each row's target length ``lengths`` (B,): (B,), the bound's length term."""
        return -self.length_log_probs().gather(-1, lengths[:, None].long())[:, 0]


def scene_terms(model: nn.Module, labels: Tensor | None) -> Tensor | None:
    """(B,) the captioner's auxiliary scene loss (``model.scene_loss``): the mean over image patches of
    −log p(what the patch's cell holds), from ``labels`` (B, 4) (``Scene.cell_labels``); None when ``model``
    (bound to its rows by ``bind_source``) has no scene head. Reads the encoding the family's loss just made."""
    from ..data.scenes import patch_labels

    if not (isinstance(model, SourceReader) and getattr(model.cfg, "scene_loss", 0)):
        return None
    if labels is None:
        raise DiffLMError("model.scene_loss needs what each scene's cells hold: train on data.corpus scenes")
    memory = model._trained if model._trained is not None else model.memory()
    logits = memory.scene_logits  # (B, P, N)
    target = patch_labels(labels, math.isqrt(logits.shape[1])).to(logits.device)
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(-1)


def length_terms(model: nn.Module, process, tokens: Tensor) -> Tensor:
    """(B,) the bound's −log p(target length | source) for rows ``tokens`` when ``model`` (bound to them by
    ``bind_source``) predicts the length, else zeros."""
    if not (isinstance(model, SourceReader) and model.predicts_length):
        return torch.zeros(tokens.shape[0], device=tokens.device)
    return model.length_nll(target_lengths(tokens, process.bos_id, process.eos_id))


def bind_source(model: nn.Module, process, tokens: Tensor, images: Tensor | None = None) -> nn.Module:
    """``model`` reading the source of the rows ``tokens`` (B, L) — or the ``images`` (B, C, H, W) they caption —
    when it is an encoder-decoder, else itself."""
    if isinstance(model, SourceReader) or not reads_source(model):
        return model
    shift = getattr(process, "input_shift", 0)
    if reads_images(model):
        if images is None:
            raise DiffLMError("this model captions images and writes nothing without one: use difflm caption RUN "
                              "IMAGE.png (DiffusionLM.caption)")
        reader = SourceReader.for_images(model, tokens, images, process.bos_id, shift)
    else:
        reader = SourceReader.for_rows(model, tokens, process.bos_id, shift)
    if getattr(process, "packs_target", False):  # the family feeds the network its target alone, from position 0
        reader.start = torch.zeros_like(reader.start)
    return reader


def reads_images(model: nn.Module) -> bool:
    """Whether ``model`` (or the network inside a wrapper) encodes images (captioning: model.image_size > 0)."""
    net = getattr(model, "module", model)
    return getattr(getattr(net, "cfg", None), "image_size", 0) > 0
