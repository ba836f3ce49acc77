"""The diffusion transformer (DiT, Peebles & Xie 2023) exactly as MDLM, SEDD and BD3-LM publish it, so their
checkpoints run in difflm (``difflm convert``): a raw embedding table, adaLN modulation in every block from the
noise level σ, weight-only LayerNorm in float32, rotary attention (half-split, θ = 10000), a GELU(tanh) MLP with
biases, and an adaLN-modulated output layer with a bias.

    c = SiLU(MLP(sinusoid₂₅₆(σ)))                                   (σ itself, not 1000·t; [cos, sin])
    h = x + g_msa · W_o attn(modulate(LN₁(x), shift_msa, scale_msa)),   modulate(x, a, b) = x(1 + b) + a
    x' = h + g_mlp · MLP(modulate(LN₂(h), shift_mlp, scale_mlp))
    logits = W modulate(LN_f(x), shift, scale) + bias

The network is always conditioned on σ; the references feed σ = 0 when a model is time-free (MDLM's and
BD3-LM's default), and difflm's time-free families pass no t, which this backbone reads as σ = 0. With time, t is
mapped to the noise of difflm's log-linear schedule α(t) = 1 − t: σ = −log α(t), capped at −log ε (the references'
α never falls below ε = 1e-3; their time t' has α = 1 − (1 − ε)t', so the same noise level sits at t = (1 − ε)t').
It takes the call signature of ``transformer.Transformer`` (block-causal masks, the KV cache, ``select``), so
every sampler runs on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import BackboneNeeds, option, register_backbone
from .base import Backbone, BackboneConfig
from .transformer import KVCache, Rotary, attend, sequence_offset

FREQ_DIM = 256  # the references' TimestepEmbedder frequency width


@dataclass
class DiTConfig(BackboneConfig):
    """``model.type: dit``: the published MDLM / SEDD / BD3-LM network (``difflm convert`` writes it)."""

    n_layer: int = option(12, ge=1)
    n_head: int = option(12, ge=1)
    d_model: int = option(768, "a multiple of n_head with an even head dimension", ge=2)
    d_cond: int = option(128, "width of the σ embedding (the references' cond_dim)", ge=1)
    mlp_ratio: int = option(4, ge=1)
    sigma_eps: float = option(1e-3, "t is fed as σ = −log max(1 − t, ε) (the references' log-linear noise, capped "
                              "where theirs ends)", gt=0, lt=1)

    def with_needs(self, needs: BackboneNeeds, vocab_size: int, max_len: int) -> DiTConfig:
        return self.derive(needs, vocab_size, max_len)


def sigma_embedding(sigma: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """The references' sinusoid of σ (B,) -> (B, dim) in float32: [cos, sin] at exp(−ln(max_period)·i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in float32 (the references' ``LayerNorm``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return (F.layer_norm(x.float(), (x.shape[-1],)) * self.weight.float()).to(x.dtype)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.norm1 = LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))
        self.ada = nn.Linear(cfg.d_cond, 6 * cfg.d_model)

    def forward(self, x, rope, c, attn_mask, causal, cache, layer, offset, positions=None, store=None):
        B, L, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = rope(q, offset, positions), rope(k, offset, positions)
        y = attend(q, k, v, attn_mask=attn_mask, causal=causal, cache=cache, layer=layer, offset=offset,
                   store=store, dropout=0.0)
        x = x + g1 * self.attn_out(y.transpose(1, 2).reshape(B, L, D))
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


@register_backbone
class DiT(Backbone):
    """(tokens (B, L), t (B,) or None) -> logits (B, L, V), with ``transformer.Transformer``'s call signature."""

    kind = "dit"
    Config = DiTConfig

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head or (cfg.d_model // cfg.n_head) % 2:
            raise ValueError("d_model must be a multiple of n_head with an even head dimension")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.sigma_mlp = nn.Sequential(nn.Linear(FREQ_DIM, cfg.d_cond), nn.SiLU(), nn.Linear(cfg.d_cond, cfg.d_cond))
        self.rope = Rotary(cfg.d_model // cfg.n_head, cfg.max_len, 10000.0)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = LayerNorm(cfg.d_model)
        self.ada_f = nn.Linear(cfg.d_cond, 2 * cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        for m in (*[b.ada for b in self.blocks], self.ada_f, self.head):  # adaLN-zero, as the references start
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def sigma(self, t: Tensor | None, B: int, device) -> Tensor:
        """The noise level the network is conditioned on: 0 without time, else σ = −log max(1 − t, ε). (B,)"""
        if t is None or not self.cfg.time_conditioning:
            return torch.zeros(B, device=device)
        t = t.expand(B) if t.dim() == 0 else t
        return -torch.log((1 - t.double()).clamp(min=self.cfg.sigma_eps)).float()

    def forward(
        self, x: Tensor, t: Tensor | None = None, attn_mask: Tensor | None = None, cache: KVCache | None = None,
        select: Tensor | None = None, x0_prev: Tensor | None = None, positions: Tensor | None = None,
        store: int | None = None, prev: Tensor | None = None, sigma: Tensor | None = None,
    ) -> Tensor:
        """As ``Transformer.forward``; ``sigma`` (B,) conditions on that noise level directly (the references'
        own input), overriding t."""
        B, L = x.shape
        offset = sequence_offset(self.cfg.max_len, L, cache, positions)
        h = self.embed(x)
        s = self.sigma(t, B, x.device) if sigma is None else sigma.to(x.device)
        c = F.silu(self.sigma_mlp(sigma_embedding(s)))
        for i, blk in enumerate(self.blocks):
            h = blk(h, self.rope, c, attn_mask, self.cfg.causal, cache, i, offset, positions, store)
        shift, scale = self.ada_f(c)[:, None].chunk(2, dim=-1)
        h = self.norm_f(h) * (1 + scale) + shift
        if select is not None:
            h = h[select]
        return self.head(h)
