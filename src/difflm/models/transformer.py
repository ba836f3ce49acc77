"""One transformer backbone for every family: pre-norm, RoPE, scaled_dot_product_attention,
optional adaLN-zero time conditioning (DiT, Peebles & Xie 2023; as used by SEDD/MDLM), and a
bidirectional or causal mask, with a KV cache for incremental decoding.

It maps tokens (B, L) and an optional time t (B,) to logits (B, L, V); with ``d_embed`` > 0 (Gaussian
embedding diffusion) it maps noisy embeddings z_t (B, L, d_embed) to x̂0 embeddings, and ``embed`` is the
learned token-embedding table that defines the diffusion space. It knows no diffusion math.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import BackboneNeeds, derived, option, register_backbone
from .base import Backbone, BackboneConfig


@dataclass
class TransformerConfig(BackboneConfig):
    """The transformer's one config: the ``model`` section of a run (n_layer ... rope_base) plus the fields
    marked derived (``BackboneConfig``), which ``components.build_components`` fills in."""

    n_layer: int = option(4, ge=1)
    n_head: int = option(4, ge=1)
    d_model: int = option(256, "a multiple of n_head with an even head dimension", ge=2)
    mlp_ratio: float = option(4.0, gt=0)
    dropout: float = option(0.0, ge=0, lt=1)
    d_time: int = option(128, "width of the time embedding (time-conditioned families)", ge=2)
    rope_base: float = option(10000.0, gt=1)
    encoder_layers: int = option(0, "seq2seq: layers of a bidirectional source encoder that every block reads by "
                                    "cross-attention, target positions numbered from 0 (CMLM / DiffuSeq-v2); 0: one "
                                    "stream, the source as given tokens", ge=0)
    length_classes: int = derived(0)  # > 0: the encoder predicts the target length 0..length_classes−1 (Mask-Predict)
    absolute_positions: bool = option(False, "add sinusoidal absolute positions to the input (an encoder-decoder's "
                                      "target numbered from 0): a masked decoder facing a row of [MASK] learns where "
                                      "it is much sooner than from rotary's relative positions alone")
    absolute_scale: float = option(0.028, "the sinusoid's multiplier: 0.028 = 0.02·√2 gives it the token "
                                   "embeddings' initial RMS (0.02), so neither swamps the other (1.0, the first "
                                   "version, buried the tokens under a signal 35 times larger)", gt=0)
    copy_source: bool = option(False, "seq2seq: the decoder's input at each target position j adds the source token "
                               "embedding at the uniformly aligned position ⌊j·copy_ratio⌋ (the last source token "
                               "past the end): Gu et al. 2018's uniform copy, so an all-[MASK] target row already "
                               "differs by position and holds the source's words")
    copy_ratio: float = option(1.0, "model.copy_source: source positions per target position (~ source length / "
                               "target length in tokens)", gt=0)
    image_size: int = derived(0)  # > 0: captioning, the encoder reads (B, 1, size, size) images (data.corpus scenes)
    patch_size: int = option(8, "captioning: the image encoder (a CNN stem, then encoder blocks) reads patches of "
                                "patch_size × patch_size pixels (a multiple of 4)", ge=4)
    image_positions: typing.Literal["learned", "sincos2d"] = option(
        "learned", "captioning: where each image patch sits. learned: a learned table added to the stem's "
        "features (starts at RMS 0.02 against features of about 0.5, so it is learned slowly); sincos2d: that table "
        "plus fixed 2D sin-cos positions at the features' scale (row in half the width, column in the other; "
        "MAE's), so 'left of' and 'above' can be read from the first step")
    image_positions_out: bool = option(False, "captioning: add the fixed 2D sin-cos positions (image_positions "
                                       "sincos2d) again to the encoder's output, so the decoder's cross-attention "
                                       "reads each patch's place whatever the encoder blocks did with it")
    image_stem: typing.Literal["conv3", "deep"] = option(
        "conv3", "captioning: the CNN stem that cuts the image into patch features. conv3: two stride-2 3×3 "
        "convolutions and a patch_size/4 one (Xiao et al. 2021's convolutional stem, ~4M multiply-adds on a 64×64 "
        "image at d_model 96); deep: a VGG-style stack, 3×3 convolutions at full, half and quarter resolution "
        "(16, 32, 64 channels) before the patch_size/4 one (~21M), a stronger reader of small items")
    scene_loss: float = option(0.0, "captioning: the weight of an auxiliary loss on the image encoder, the "
                               "cross-entropy of what each patch's cell holds (nothing, or one size × class: "
                               "the scene graph the captions are written from), per caption token; a head on the "
                               "encoder's states, so recognition is taught where it happens and not only through "
                               "the caption (0: none)", ge=0)
    init: str | None = option(None, "a difflm model folder (a run folder) whose weights start this run, every tensor "
                              "of the same name (shapes must agree; the rest, e.g. time layers, start fresh): an "
                              "AR model of the same shape adapted to a diffusion family, the tokenizer its own")
    shift: bool = option(False, "AR→diffusion adaptation: the output at position i predicts token i+1, so an AR "
                         "model's next-token decoder is reused as it was trained (Dream, DiffuLLaMA)")
    anneal_steps: int = option(0, "AR→diffusion adaptation: the decoder's attention opens from causal to the "
                               "family's mask over the first N training steps (DiffuLLaMA's annealing)", ge=0)

    def with_needs(self, needs: BackboneNeeds, vocab_size: int, max_len: int) -> TransformerConfig:
        if needs.attention == "causal" and (self.shift or self.anneal_steps):
            raise ValueError("model.shift and model.anneal_steps adapt an AR model to a diffusion family; the "
                             "autoregressive family already predicts the next token: remove them")
        if self.shift and needs.d_embed:
            raise ValueError("model.shift is for the discrete families (logits per token), not embedding diffusion")
        if self.copy_source and not self.encoder_layers:
            raise ValueError("model.copy_source copies an encoder-decoder's source into its decoder input: set "
                             "model.encoder_layers (or remove model.copy_source)")
        return self.derive(needs, vocab_size, max_len, embeddings=True, aux=True, marks=True)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000, as DDPM/DiT do): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sinusoid(pos: Tensor, dim: int) -> Tensor:
    """Sinusoidal embeddings of integer positions (...) -> (..., dim): [cos(p·ω_i), sin(p·ω_i)], ω_i = 10⁴^(−2i/dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    args = pos.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos positions of a grid × grid patch raster -> (grid², dim): the row's sinusoid in the first
    half of the width, the column's in the second (MAE, He et al. 2022), raster order as the patches."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    half = dim // 2
    table = torch.cat([sinusoid(rows.flatten(), half), sinusoid(cols.flatten(), half)], dim=-1)
    return F.pad(table, (0, dim - table.shape[-1]))  # an odd half leaves a zero column or two


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), rotate-half form, cos/sin kept in fp32."""

    def __init__(self, head_dim: int, max_len: int, base: float) -> None:
        super().__init__()
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1), persistent=False)

    def forward(self, x: Tensor, offset: int, positions: Tensor | None = None) -> Tensor:  # x: (B, H, L, Dh)
        """positions: (L,) shared by the rows, or (B, L) one numbering per row (encoder-decoder targets)."""
        L = x.shape[-2]
        idx = slice(offset, offset + L) if positions is None else positions
        cos, sin = self.cos[idx].to(x.dtype), self.sin[idx].to(x.dtype)
        if cos.dim() == 3:  # (B, L, Dh) -> (B, 1, L, Dh): every head of a row
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (B, H, T, Dh) each. Shared by autoregressive
    decoding and block diffusion (which stores only a call's clean prefix: ``store`` in ``append``).

    With ``capacity`` the cache is static: every call attends over exactly ``capacity`` key slots, those not
    yet written masked out. A query row then sums over the same number of keys in every call, and in a full
    forward pass over ``capacity`` positions, so bf16 results do not depend on how the sequence was split
    into calls (the summation order of the attention kernels depends on the key count)."""

    def __init__(self, n_layer: int, capacity: int | None = None) -> None:
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer
        self.capacity = capacity
        self._length = 0
        self.last: Tensor | None = None  # (B, D) final hidden state of the last stored position (shifted backbones)

    @property
    def length(self) -> int:
        if self.capacity is not None:
            return self._length
        return 0 if self.k[0] is None else self.k[0].shape[-2]

    def rows(self, idx: Tensor | slice, length: int | None = None) -> KVCache:
        """A read-only copy holding the rows ``idx`` (for calls on a subset of the batch, ``store=0``; a slice
        gives views, not copies); with ``length``, only their first ``length`` positions (those the call reads)."""
        sub = KVCache(len(self.k), self.capacity)
        cut = slice(None) if length is None else slice(0, length)
        sub.k = [None if k is None else k[idx, :, cut] for k in self.k]
        sub.v = [None if v is None else v[idx, :, cut] for v in self.v]
        sub._length = self._length
        sub.last = None if self.last is None else self.last[idx]
        return sub

    def append(self, layer: int, k: Tensor, v: Tensor, store: int | None = None) -> tuple[Tensor, Tensor]:
        """Keys/values to attend to (cache + new; with a capacity, all ``capacity`` slots); of the new
        positions the first ``store`` (None: all) are kept."""
        n = k.shape[-2]
        if self.capacity is not None:
            old = self._length
            if old + n > self.capacity:
                raise ValueError(f"KV cache of capacity {self.capacity} cannot take {old + n} positions")
            if self.k[layer] is None:
                shape = (*k.shape[:-2], self.capacity, k.shape[-1])
                self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
            # the positions past ``store`` are written too (this call attends to them) and overwritten later
            self.k[layer][..., old : old + n, :] = k
            self.v[layer][..., old : old + n, :] = v
            if layer == len(self.k) - 1:
                self._length = old + (n if store is None else store)
            return self.k[layer], self.v[layer]
        old = 0 if self.k[layer] is None else self.k[layer].shape[-2]
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=-2)
            v = torch.cat([self.v[layer], v], dim=-2)
        keep = k.shape[-2] if store is None else old + store
        self.k[layer], self.v[layer] = k[..., :keep, :], v[..., :keep, :]
        return k, v


def attend(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None, causal: bool, cache: KVCache | None,
           layer: int, offset: int, store: int | None, dropout: float) -> Tensor:
    """Scaled dot-product attention of queries (B, H, L, Dh) over keys/values (B, H_kv, L, Dh) (H_kv divides H:
    grouped-query attention) with everything the backbones share: the KV cache (growing, or static with
    unwritten slots masked), a causal or given mask. Returns (B, H, L, Dh)."""
    B, H, L, _ = q.shape
    if cache is not None:
        k, v = cache.append(layer, k, v, store)
    if k.shape[1] != H:  # grouped-query attention: each key/value head serves H / H_kv query heads
        k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    is_causal = causal and attn_mask is None
    if cache is not None and cache.capacity is not None:  # static cache: mask the slots past this call
        T, end = k.shape[-2], offset + L
        if attn_mask is None:
            attn_mask = torch.ones(L, end, dtype=torch.bool, device=q.device)
            if causal:
                attn_mask = attn_mask.tril(diagonal=offset)
        attn_mask = F.pad(attn_mask[..., :end], (0, T - end), value=False)
        is_causal = False
    elif is_causal and offset > 0:  # new queries attend to the whole past and causally among themselves
        if L == 1:
            is_causal = False
        else:
            T = k.shape[-2]
            attn_mask = torch.ones(L, T, dtype=torch.bool, device=q.device).tril(diagonal=T - L)
            is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout)


def sequence_offset(max_len: int, L: int, cache: KVCache | None, positions: Tensor | None) -> int:
    """Where this call's positions start (the cache length), after checking they fit the model's max_len."""
    offset = cache.length if cache is not None else 0
    if (offset + L if positions is None else int(positions.max()) + 1) > max_len:
        raise ValueError(f"sequence of {offset + L} tokens exceeds the model's max_len {max_len}")
    return offset


def time_condition(model: nn.Module, t: Tensor | None, B: int) -> Tensor | None:
    """The time embedding c (B, d_time) a time-conditioned backbone feeds its adaLN layers, else None."""
    if not model.cfg.time_conditioning:
        return None
    if t is None:
        raise ValueError("this model is time-conditioned: pass t")
    return model.time_mlp(timestep_embedding(t.expand(B) if t.dim() == 0 else t, model.cfg.d_time))


def shift_states(h: Tensor, prev: Tensor | None, cache: KVCache | None, store: int | None) -> Tensor:
    """Dream's shift: h (B, L, D) re-indexed so position i holds the hidden state of the token before it
    (``prev`` (L,): that token's index in this call, default i − 1; −1: the cache's last stored position), so a
    next-token head predicts token i there. The first position, with nothing before it, keeps its own; the cache
    remembers the last stored position's state, which predicts the first token of the next call."""
    B, L, _ = h.shape
    first = h[:, :1] if cache is None or cache.last is None else cache.last[:, None].to(h.dtype)
    if cache is not None and store != 0:
        cache.last = h[:, (L if store is None else store) - 1]
    idx = torch.arange(-1, L - 1, device=h.device) if prev is None else prev.to(h.device)
    return torch.cat([first, h], 1)[:, idx + 1]


@dataclass
class Memory:
    """A source as the encoder read it: ``states`` (B, S, D), ``mask`` (B, S) True at real source positions (the
    rest is padding no query attends to), ``start`` (B,) where each row's target begins in the decoder's input:
    the decoder numbers positions from there (0 at the target's [BOS]) and does not attend to what lies before.
    ``kv`` keeps each layer's rotated cross-attention keys and values once computed (sampling, not training)."""

    states: Tensor
    mask: Tensor
    start: Tensor
    kv: dict = field(default_factory=dict)
    length_logits: Tensor | None = None  # (B, C): the predicted target length's logits (cfg.length_classes)
    rotary: bool = True  # cross-attention rotates queries and keys (a text source; an image's patches are not a line)
    embedded: Tensor | None = None  # (B, S, D): the source's token embeddings (cfg.copy_source)
    scene_logits: Tensor | None = None  # (B, P, N_CELL_LABELS): what each patch's cell holds (cfg.scene_loss)

    def rows(self, idx: Tensor) -> Memory:
        return Memory(self.states[idx], self.mask[idx], self.start[idx],
                      {i: (k[idx], v[idx]) for i, (k, v) in self.kv.items()},
                      None if self.length_logits is None else self.length_logits[idx], self.rotary,
                      None if self.embedded is None else self.embedded[idx],
                      None if self.scene_logits is None else self.scene_logits[idx])

    def uniform_copy(self, positions: Tensor, ratio: float) -> Tensor:
        """The source embedding each target position reads (Gu et al. 2018 §3.1, uniform copy): position j (numbered
        from 0 at the target's [BOS]) takes source position min(⌊j·ratio⌋, n−1), n the row's source length.
        positions: (B, L) long -> (B, L, D)."""
        n = self.mask.sum(-1)  # ≥ 1: an empty source keeps one padding key (encode)
        idx = torch.minimum((positions.float() * ratio).floor().long(), (n - 1)[:, None])
        return self.embedded.gather(1, idx[..., None].expand(-1, -1, self.embedded.shape[-1]))


class CrossAttention(nn.Module):
    """Queries from the decoder (B, L, D) over the encoder's states (B, S, D), padded source positions masked.
    Rotary on both sides (target positions from 0, source positions from 0) biases attention towards the
    monotone alignment most seq2seq pairs have without ruling any other out; an image's patches go unrotated."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, memory: Memory, rope: Rotary, positions: Tensor, layer: int) -> Tensor:
        B, L, D = x.shape
        S, H = memory.states.shape[1], self.n_head
        q = self.q(x).view(B, L, H, D // H).transpose(1, 2)
        q = rope(q, 0, positions) if memory.rotary else q
        kv = memory.kv.get(layer)
        if kv is None or kv[0].dtype != q.dtype:
            k, v = self.kv(memory.states.to(x.dtype)).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
            kv = (rope(k, 0) if memory.rotary else k), v
            if not (self.training and torch.is_grad_enabled()):
                memory.kv[layer] = kv
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=memory.mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, rope: Rotary, attn_mask: Tensor | None, causal: bool,
        cache: KVCache | None, layer: int, offset: int, positions: Tensor | None = None, store: int | None = None,
    ) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = rope(q, offset, positions), rope(k, offset, positions)
        y = attend(q, k, v, attn_mask=attn_mask, causal=causal, cache=cache, layer=layer, offset=offset, store=store,
                   dropout=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm block: self-attention, then (decoders of an encoder-decoder model) cross-attention to the source,
    then the MLP; with adaLN-zero time conditioning when the config asks for it and ``timed``."""

    def __init__(self, cfg: TransformerConfig, *, cross: bool = False, timed: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, hidden, bias=False), nn.GELU(approximate="tanh"),
            nn.Linear(hidden, cfg.d_model, bias=False),
        )
        self.drop = nn.Dropout(cfg.dropout)
        # adaLN-zero: shift, scale, gate for attention and MLP, zero-initialised so each block starts as identity
        self.ada = nn.Linear(cfg.d_time, 6 * cfg.d_model) if cfg.time_conditioning and timed else None
        self.norm_x = nn.LayerNorm(cfg.d_model) if cross else None
        self.cross = CrossAttention(cfg) if cross else None

    def forward(self, x, rope, c, attn_mask, causal, cache, layer, offset, positions=None, store=None, memory=None):
        if self.ada is None:
            x = x + self.drop(self.attn(self.norm1(x), rope, attn_mask, causal, cache, layer, offset, positions, store))
            if self.cross is not None:
                x = x + self.drop(self.cross(self.norm_x(x), memory, rope, positions, layer))
            return x + self.drop(self.mlp(self.norm2(x)))
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        x = x + g1 * self.drop(self.attn(h, rope, attn_mask, causal, cache, layer, offset, positions, store))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.norm_x(x), memory, rope, positions, layer))
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + g2 * self.drop(self.mlp(h))


@register_backbone
class Transformer(Backbone):
    """Denoiser / language-model backbone: (tokens (B, L), t (B,) or None) -> logits (B, L, V)."""

    kind = "transformer"
    Config = TransformerConfig

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head or (cfg.d_model // cfg.n_head) % 2:
            raise ValueError("d_model must be a multiple of n_head with an even head dimension")
        self.cfg = cfg
        emb = cfg.d_embed or cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, emb)
        if cfg.input_marks:  # a learned embedding per input mark (the edit generator's kept / deleted / slot)
            self.mark_embed = nn.Embedding(cfg.input_marks, emb)
        if cfg.d_embed:
            self.in_proj = nn.Linear(emb * (2 if cfg.self_conditioning else 1), cfg.d_model)
        patches = (cfg.image_size // cfg.patch_size) ** 2 if cfg.image_size else 0
        self.rope = Rotary(cfg.d_model // cfg.n_head, max(cfg.max_len, patches), cfg.rope_base)
        if cfg.encoder_layers:  # the source encoder: bidirectional, time-free; its own embedding in embedding diffusion
            self.encoder = nn.ModuleList(Block(cfg, timed=False) for _ in range(cfg.encoder_layers))
            self.encoder_norm = nn.LayerNorm(cfg.d_model)
            self.source_embed = nn.Embedding(cfg.vocab_size, cfg.d_model) if cfg.d_embed else None
            # Mask-Predict's length predictor: the mean of the encoder's states, plus an embedding of the source's
            # length (a mean alone cannot count), -> the target length
            self.length_head = nn.Linear(cfg.d_model, cfg.length_classes) if cfg.length_classes else None
            self.source_length = nn.Embedding(cfg.max_len + 1, cfg.d_model) if cfg.length_classes else None
        if cfg.image_size:  # captioning: a small CNN stem cuts the image into patch features (the convolutional
            # stem of Xiao et al. 2021, "Early convolutions help transformers see better"), then the encoder blocks
            if not cfg.encoder_layers:
                raise ValueError("an image captioner reads its image through an encoder: set model.encoder_layers")
            if cfg.copy_source:
                raise ValueError("model.copy_source copies source tokens; an image has none: remove it")
            if cfg.image_size % cfg.patch_size or cfg.patch_size % 4:
                raise ValueError(f"model.patch_size {cfg.patch_size} must be a multiple of 4 that divides the image "
                                 f"size {cfg.image_size}")
            n, d, k = (cfg.image_size // cfg.patch_size) ** 2, cfg.d_model, cfg.patch_size // 4
            if cfg.image_stem == "deep":  # (B, 1, S, S) -> (B, d, S/p, S/p): 3×3 convs at S, S/2, S/4, a k×k one
                self.image_stem = nn.Sequential(
                    nn.Conv2d(1, 16, 3, 1, 1), nn.GELU(), nn.Conv2d(16, 32, 3, 2, 1), nn.GELU(),
                    nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(), nn.Conv2d(64, 64, 3, 1, 1), nn.GELU(),
                    nn.Conv2d(64, d, k, k))
            else:  # (B, 1, S, S) -> (B, d, S/p, S/p): two stride-2 3×3 convs, a k×k one
                self.image_stem = nn.Sequential(
                    nn.Conv2d(1, d // 4, 3, 2, 1), nn.GELU(), nn.Conv2d(d // 4, d // 2, 3, 2, 1), nn.GELU(),
                    nn.Conv2d(d // 2, d, k, k))
            self.patch_pos = nn.Parameter(torch.zeros(n, cfg.d_model))  # learned 2D positions, with rotary's 1D ones
            if cfg.image_positions == "sincos2d":
                self.register_buffer("patch_sincos", sincos_2d(cfg.image_size // cfg.patch_size, d), persistent=False)
            if cfg.image_positions_out and cfg.image_positions != "sincos2d":
                raise ValueError("model.image_positions_out adds the fixed 2D positions again: set "
                                 "model.image_positions: sincos2d")
            if cfg.scene_loss:  # each patch's state -> what its cell holds (model.scene_loss)
                from ..data.scenes import N_CELL_LABELS

                self.scene_head = nn.Linear(d, N_CELL_LABELS)
        elif cfg.scene_loss:
            raise ValueError("model.scene_loss teaches a captioner's image encoder; this model reads no image "
                             "(data.corpus scenes): remove it")
        self.blocks = nn.ModuleList(Block(cfg, cross=cfg.encoder_layers > 0) for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.d_embed or cfg.vocab_size, bias=False)
        if cfg.aux_outputs:  # a second prediction per position (the edit family's tagger)
            self.aux_head = nn.Linear(cfg.d_model, cfg.aux_outputs)
        if cfg.time_conditioning:
            self.time_mlp = nn.Sequential(
                nn.Linear(cfg.d_time, cfg.d_time), nn.SiLU(), nn.Linear(cfg.d_time, cfg.d_time), nn.SiLU()
            )
            self.ada_f = nn.Linear(cfg.d_time, 2 * cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith(("attn.proj.weight", "mlp.2.weight", "cross.proj.weight")):
                    std = 0.02 / math.sqrt(2 * self.cfg.n_layer)  # GPT-2 residual scaling
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            if blk.ada is not None:
                nn.init.zeros_(blk.ada.weight)
                nn.init.zeros_(blk.ada.bias)
        if self.cfg.time_conditioning:
            nn.init.zeros_(self.ada_f.weight)
            nn.init.zeros_(self.ada_f.bias)
        if self.cfg.image_size:  # the stem's convolutions keep unit scale (He init), not GPT-2's 0.02
            for m in self.image_stem:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.zeros_(self.head.weight)  # start from the uniform prediction (as SEDD's final layer)
        if self.cfg.d_embed:  # unit-variance embeddings: the scale the variance-preserving process assumes
            nn.init.normal_(self.embed.weight, 0.0, 1.0)

    def forward(
        self, x: Tensor, t: Tensor | None = None, attn_mask: Tensor | None = None,
        cache: KVCache | None = None, select: Tensor | None = None, x0_prev: Tensor | None = None,
        positions: Tensor | None = None, store: int | None = None, prev: Tensor | None = None,
        head: str = "token", memory: Memory | None = None, marks: Tensor | None = None,
    ) -> Tensor:
        """x: (B, L) token ids; t: (B,) times in [0, 1] (used only with time_conditioning);
        attn_mask: bool, broadcastable to (B, H, L, L_total), True = may attend;
        select: optional (B, L) bool — compute the output head only there (the loss needs no more);
        positions: optional (L,) long RoPE positions (default: cache length + 0..L−1; block diffusion feeds
        [x_t, x0] both at 0..L−1); store: with ``cache``, how many leading new positions to keep in it;
        prev: (L,) where each position's preceding token sits (read only with ``cfg.shift``: ``shift_states``);
        head: "token" (logits) or "aux" (the auxiliary head, ``cfg.aux_outputs`` wide);
        memory: the encoded source (``encode``), required when ``cfg.encoder_layers`` > 0;
        marks: optional (B, L) long in 0..cfg.input_marks−1, embedded and added to the tokens' (None: all 0).
        Returns logits (B, L, V), or (N, V) for the N selected positions in row-major order.
        Embedding diffusion (d_embed > 0): x is z_t (B, L, d_embed) float, x0_prev the self-conditioning input
        (zeros when None); returns x̂0 (B, L, d_embed)."""
        B, L = x.shape[:2]
        offset = sequence_offset(self.cfg.max_len, L, cache, positions)
        if cache is None and self.cfg.anneal_steps:
            attn_mask = self.annealed_mask(attn_mask, L, positions, x.device)
        if self.cfg.encoder_layers:
            if memory is None:
                raise ValueError("this model reads its source through an encoder: call it with memory=encode(...)")
            attn_mask, positions = self.target_view(memory.start, offset, L, cache, attn_mask, positions)
        if self.cfg.d_embed:
            if self.cfg.self_conditioning:
                x = torch.cat([x, torch.zeros_like(x) if x0_prev is None else x0_prev.to(x.dtype)], -1)
            h = self.in_proj(x)
        else:
            h = self.embed(x)
            if self.cfg.input_marks:
                h = h + (self.mark_embed.weight[0] if marks is None else self.mark_embed(marks))
        if self.cfg.absolute_positions:  # Vaswani et al. 2017 §3.5 on top of rotary: where a query is, not only how far
            pos = positions if positions is not None else torch.arange(offset, offset + L, device=h.device)[None]
            h = h + (self.cfg.absolute_scale * sinusoid(pos, h.shape[-1])).to(h.dtype)
        if self.cfg.copy_source:  # positions: the target's own numbering (target_view)
            h = h + memory.uniform_copy(positions, self.cfg.copy_ratio).to(h.dtype)
        c = time_condition(self, t, B)
        for i, blk in enumerate(self.blocks):
            h = blk(h, self.rope, c, attn_mask, self.cfg.causal, cache, i, offset, positions, store, memory)
        h = self.norm_f(h)
        if c is not None:
            shift, scale = self.ada_f(c)[:, None].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        if self.cfg.shift:
            h = shift_states(h, prev, cache, store)
        if select is not None:
            h = h[select]
        return self.aux_head(h) if head == "aux" else self.head(h)

    def pretrained_init(self) -> bool:
        """Load ``cfg.init``'s weights (a fresh training run starts from them); False when there is none."""
        if not self.cfg.init:
            return False
        from .weights import load_difflm_folder

        load_difflm_folder(self, self.cfg.init)
        return True

    def encode(self, source: Tensor, mask: Tensor, start: Tensor) -> Memory:
        """The source encoder (``cfg.encoder_layers`` > 0): tokens (B, S), left-aligned with ``mask`` (B, S) True at
        real positions, read bidirectionally at positions 0..S−1 with padding masked; ``start`` (B,) where each
        row's target begins in the decoder's input. It never sees a target token."""
        mask = mask.clone()
        mask[:, 0] |= ~mask.any(-1)  # an empty source still has one (padding) key, so no attention row is empty
        h = self.embed(source) if self.source_embed is None else self.source_embed(source)
        embedded = h if self.cfg.copy_source else None
        keys = mask[:, None, None, :]
        for i, blk in enumerate(self.encoder):
            h = blk(h, self.rope, None, keys, False, None, i, 0)
        h = self.encoder_norm(h)
        length = None
        if self.length_head is not None:
            n = mask.sum(-1, keepdim=True)
            pooled = (h * mask[..., None]).sum(1) / n.clamp_min(1) + self.source_length(n[:, 0])
            length = self.length_head(pooled).float()
        return Memory(h, mask, start, length_logits=length, embedded=embedded)

    def encode_image(self, images: Tensor, start: Tensor) -> Memory:
        """The image encoder (``cfg.image_size`` > 0): images (B, 1, S, S) in [0, 1] (a blank image: zeros), cut by
        the CNN stem into P = (S/patch_size)² patch features and read bidirectionally by the encoder
        blocks -> Memory with states (B, P, D), every patch a real key."""
        S = self.cfg.image_size
        if tuple(images.shape[1:]) != (1, S, S):
            raise ValueError(f"this model reads (B, 1, {S}, {S}) images, got {tuple(images.shape)}")
        x = images.to(self.patch_pos.dtype)  # background 0: the ink is the signal
        h = self.image_stem(x).flatten(2).transpose(1, 2) + self.patch_pos  # (B, P, D), patches in raster order
        if self.cfg.image_positions == "sincos2d":
            h = h + self.patch_sincos.to(h.dtype)
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        for i, blk in enumerate(self.encoder):
            h = blk(h, self.rope, None, None, False, None, i, 0)
        h = self.encoder_norm(h)
        length = None
        if self.length_head is not None:
            length = self.length_head(h.mean(1)).float()  # the caption's length from the pooled image
        scene = self.scene_head(h).float() if self.cfg.scene_loss else None
        if self.cfg.image_positions_out:
            h = h + self.patch_sincos.to(h.dtype)
        return Memory(h, mask, start, length_logits=length, rotary=False, scene_logits=scene)

    def target_view(self, start: Tensor, offset: int, L: int, cache: KVCache | None, attn_mask: Tensor | None = None,
                    positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The decoder's mask (B, 1, L, T) and positions (B, L) for a call on input positions offset..offset+L−1
        (or on row positions ``positions`` (L,) or (B, L): block diffusion's [x_t, x0] input, a window of each row
        over a cache of the whole row): positions count from each
        row's ``start``; a query attends to keys at or after it (causally when the family is causal; within the
        family's own ``attn_mask`` when it sets one) and to itself (so the unused queries before ``start`` stay
        finite)."""
        T = offset + L if cache is not None else L
        q = positions if positions is not None else torch.arange(offset, offset + L, device=start.device)
        qq = q if q.dim() == 2 else q[None]  # (B or 1, L)
        # the keys' positions: the cache's (stored at 0..offset−1), then this call's own
        k = torch.cat([torch.arange(offset, device=start.device).expand(qq.shape[0], -1), qq], 1) if cache is not None \
            else qq
        allowed = (k >= start[:, None])[:, None, :].expand(-1, L, -1)[:, None]  # (B, 1, L, T)
        if self.cfg.causal:
            allowed = allowed & (k[:, None, :] <= qq[:, :, None])[:, None]
        if attn_mask is not None:
            allowed = allowed & attn_mask.to(torch.bool)
        own = torch.arange(L, device=start.device)  # each query's own key: the same input slot
        allowed = allowed | (torch.arange(T, device=start.device)[None, :] == own[:, None] + (T - L))
        return allowed, (qq - start[:, None]).clamp(min=0)
