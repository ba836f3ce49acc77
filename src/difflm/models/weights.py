"""Pretrained weights: for the llama backbone, one table from Hugging Face Llama names to difflm's, the
checkpoint's architecture as ``LlamaConfig`` fields, and loading (with the embedding grown for difflm's added
special tokens) — nothing else in difflm knows the foreign names; for the transformer, a difflm model folder's
own weights (``load_difflm_folder``: an AR model adapted to a diffusion family)."""

from __future__ import annotations

import re
from functools import lru_cache

import torch
from torch import nn

from ..errors import DiffLMError

#: Hugging Face Llama tensor name (regex) -> difflm llama backbone name
HF_LLAMA = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", r"blocks.\1.attn.\2_proj.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blocks.\1.\2_proj.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.input_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.post_attn_norm.weight"),
    (r"model\.norm\.weight", "norm_f.weight"),
    (r"lm_head\.weight", "head.weight"),
]
LLAMA_TYPES = ("llama",)


def grow_rows(w: torch.Tensor, rows: int, value: float | None = None) -> torch.Tensor:
    """``w`` (n, ...) with rows appended up to ``rows``: each the mean row (``value`` None: an embedding for a token
    the checkpoint lacks) or filled with ``value``."""
    extra = rows - w.shape[0]
    if extra <= 0:
        return w
    new = w.mean(0, keepdim=True).expand(extra, *w.shape[1:]) if value is None \
        else w.new_full((extra, *w.shape[1:]), value)
    return torch.cat([w, new])


def rename(state: dict[str, torch.Tensor], table: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """A foreign state dict in difflm's names; tensors the table does not name (rotary caches) are dropped."""
    out = {}
    for name, t in state.items():
        for pat, repl in table:
            if re.fullmatch(pat, name):
                out[re.sub(pat, repl, name)] = t
                break
    return out


@lru_cache(maxsize=8)
def pretrained_architecture(spec: str) -> dict:
    """The ``LlamaConfig`` fields a checkpoint fixes (a one-line error for another architecture)."""
    from ..hub import load_config

    c = load_config(spec)
    if getattr(c, "model_type", None) not in LLAMA_TYPES:
        raise DiffLMError(f"{spec} is a {getattr(c, 'model_type', 'unknown')} model; model.type llama loads "
                          f"Llama-architecture checkpoints ({', '.join(LLAMA_TYPES)})")
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return {"n_layer": c.num_hidden_layers, "n_head": c.num_attention_heads,
            "n_kv_head": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "d_model": c.hidden_size, "d_ff": c.intermediate_size, "rms_eps": float(c.rms_norm_eps),
            "rope_theta": float(theta or getattr(c, "rope_theta", 10000.0)),
            "tie_embeddings": bool(getattr(c, "tie_word_embeddings", True))}


def load_pretrained(model: nn.Module, spec: str) -> None:
    """Copy a Llama checkpoint's weights into ``model`` (a ``Llama`` built from ``pretrained_architecture``).
    A vocabulary larger than the checkpoint's (difflm's [MASK], [PAD], ... added to its tokenizer) keeps the
    pretrained rows and starts the new ones at the mean embedding; a smaller one is an error."""
    from ..hub import load_model

    hf = load_model(spec)
    state = rename(hf.state_dict(), HF_LLAMA)
    del hf
    V = model.embed.weight.shape[0]
    for key in ("embed.weight", "head.weight"):
        if key not in state:
            continue
        w = state[key]
        if w.shape[0] > V:
            raise DiffLMError(f"the tokenizer has {V} tokens but {spec}'s embedding has {w.shape[0]}: use the "
                              "checkpoint's own tokenizer (tokenizer: {type: hf, path: ...})")
        if w.shape[0] < V:
            state[key] = grow_rows(w, V)
    if model.head is None:
        state.pop("head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # new: time conditioning, the edit family's tagger
    missing = [k for k in missing if not (k.startswith(("time_mlp.", "aux_head.", "mark_embed.")) or ".ada." in k)]
    if missing or unexpected:
        raise DiffLMError(f"{spec} does not fit the llama backbone (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")


#: transformer tensors a family may have that the init folder's lacks: they start fresh (time conditioning, the
#: length predictor, the edit tagger and its generator's marks)
FRESH = ("time_mlp.", "ada_f.", ".ada.", "length_head.", "source_length.", "aux_head.", "mark_embed.")


def load_difflm_folder(model: nn.Module, folder: str) -> None:
    """Copy a difflm model folder's weights (``folder``/model.safetensors, checked against its manifest) into
    ``model``, a transformer of the same shape: every tensor by name, those in ``FRESH`` left as initialised when
    the folder lacks them. A one-line error names the first tensor that does not fit."""
    from pathlib import Path

    from ..io import read_json, read_safetensors
    from ..runfolder import check_model_folder

    path = Path(folder).expanduser()
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise DiffLMError(f"model.init {folder}: not a difflm model folder (config.json, model.safetensors); give "
                          "a trained run's folder")
    check_model_folder(path)
    kind = (read_json(path / "config.json").get("backbone") or {}).get("type", "transformer")
    if kind != "transformer":
        raise DiffLMError(f"model.init {folder} holds a {kind} backbone; model.type transformer starts only from "
                          "a transformer's weights")
    state, _ = read_safetensors(path / "model.safetensors")
    own = model.state_dict()
    for name, w in state.items():
        if name not in own:
            raise DiffLMError(f"model.init {folder}: its tensor {name} has no place in this model; give the model "
                              "the same shape (model.n_layer, encoder_layers, ...)")
        if tuple(w.shape) != tuple(own[name].shape):
            raise DiffLMError(f"model.init {folder}: {name} is {tuple(w.shape)} there and {tuple(own[name].shape)} "
                              "here; give the model the same shape (model.d_model, n_layer, ...) and tokenizer")
    missing = [k for k in own if k not in state and not any(f in k for f in FRESH)]
    if missing:
        raise DiffLMError(f"model.init {folder} lacks {missing[0]} (and {len(missing) - 1} more); give the model "
                          "the same shape")
    model.load_state_dict(state, strict=False)
