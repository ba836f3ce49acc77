"""Masked diffusion models published as Hugging Face models — LLaDA (Nie et al. 2025), Dream (Ye et al. 2025) —
run by difflm's samplers and evaluator without copying their weights (``difflm convert --from llada|dream``).

The wrapper calls the model with its own code (``trust_remote_code``) and reads its logits:

* ``shift``: Dream, adapted from an AR model, predicts token i at position i − 1 (its generation code shifts
  the logits right by one); LLaDA predicts in place.
* ``attention``: ``native`` leaves attention to the model (LLaDA and Dream are bidirectional) and refuses the
  masks of families that need others; ``mask`` passes difflm's mask as a 4-D boolean ``attention_mask`` (all True
  for bidirectional), for models built on transformers' attention, which then also serve the block family.
* The logits are cut (or padded with −inf) to difflm's vocabulary; [MASK] is the model's own mask token.

It has no KV cache of difflm's kind: the block sampler recomputes the clean prefix at every call instead
(``kv_cache = False``; the same tokens, by the sampler's own contract). The weights stay where they are: the
model folder records the path, and the wrapper loads it when built. It is for sampling and evaluation; training
such a model is the llama backbone's job (``model.init``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..errors import DiffLMError
from ..registry import BackboneNeeds, option, register_backbone
from .base import Backbone, BackboneConfig
from .transformer import KVCache

INSTALL = "pip install transformers"


@dataclass
class HFDenoiserConfig(BackboneConfig):
    """``model.type: hf``: a Hugging Face masked-diffusion model used as it is."""

    path: str = option("", "the model: a folder or a hub name (GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Base-7B)")
    shift: bool = option(False, "the output at position i predicts token i + 1 (Dream)")
    attention: Literal["native", "mask"] = option("native", "native: the model's own (bidirectional) attention; "
                                                  "mask: difflm's masks as a 4-D attention_mask")
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = option(True, "run the model's own modeling code (LLaDA and Dream need it)")

    def with_needs(self, needs: BackboneNeeds, vocab_size: int, max_len: int) -> HFDenoiserConfig:
        if needs.d_embed or needs.time_conditioning or needs.self_conditioning:
            raise ValueError("a wrapped Hugging Face model is a time-free token denoiser: use a masked or block "
                             "family with time_conditioning false")
        if needs.attention != "bidirectional" and self.attention == "native":
            raise ValueError(f"the {needs.attention} family needs its own attention masks: model.attention mask")
        if not self.path:
            raise ValueError("model.path names the Hugging Face model to wrap")
        return self.derive(needs, vocab_size, max_len)


def load_hf_model(path: str, trust_remote_code: bool, dtype: str):
    """The model with its own code, its config's causal-LM class when it names one (its logits), else AutoModel
    (LLaDA's and Dream's entry points); eval mode on the CPU."""
    if importlib.util.find_spec("transformers") is None:
        raise DiffLMError(f"wrapping a Hugging Face model needs transformers; run: {INSTALL}")
    import transformers

    from ..hub import dtype_kwarg

    where = str(Path(path).expanduser()) if Path(path).expanduser().exists() else path
    try:
        cfg = transformers.AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        arch = (getattr(cfg, "architectures", None) or [""])[0]
        loader = transformers.AutoModelForCausalLM if arch.endswith("ForCausalLM") else transformers.AutoModel
        model = loader.from_pretrained(where, trust_remote_code=trust_remote_code,
                                       **dtype_kwarg(getattr(torch, dtype)))
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise DiffLMError(f"cannot load the Hugging Face model {path!r}: {str(e).splitlines()[0][:160]}") from None
    return model.eval()


@register_backbone
class HFDenoiser(Backbone):
    """(tokens (B, L), t ignored) -> logits (B, L, V) from a wrapped Hugging Face model."""

    kind = "hf"
    Config = HFDenoiserConfig
    kv_cache = False  # samplers recompute the prefix instead

    def __init__(self, cfg: HFDenoiserConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks: list = []  # no layers of difflm's: the samplers' KV caches stay empty
        object.__setattr__(self, "hf", load_hf_model(cfg.path, cfg.trust_remote_code, cfg.dtype))  # not saved
        emb = self.hf.get_input_embeddings()
        self.model_vocab = int(emb.weight.shape[0]) if emb is not None else int(self.hf.config.vocab_size)

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .float() reach the unregistered model too
        self.hf._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self.hf.train(mode)
        return super().train(mode)

    def pretrained_init(self) -> bool:
        """Backbone contract: the wrapped weights are loaded when the wrapper is built; nothing to train from."""
        return False

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    def forward(
        self, x: Tensor, t: Tensor | None = None, attn_mask: Tensor | None = None, cache: KVCache | None = None,
        select: Tensor | None = None, x0_prev: Tensor | None = None, positions: Tensor | None = None,
        store: int | None = None, prev: Tensor | None = None,
    ) -> Tensor:
        """As ``Transformer.forward``; a ``cache`` must be empty (the block sampler's recomputing route passes a
        throwaway one)."""
        if cache is not None and cache.length > 0:
            raise DiffLMError("a wrapped Hugging Face model has no KV cache: sample with the cache off")
        B, L = x.shape
        V = self.cfg.vocab_size
        # ids past the model's table (difflm's [PAD]/[BOS], never data) enter as id 0
        ids = x if V <= self.model_vocab else torch.where(x < self.model_vocab, x, torch.zeros_like(x))
        kw = {}
        if self.cfg.attention == "mask":
            m = torch.ones(L, L, dtype=torch.bool, device=x.device) if attn_mask is None else attn_mask.bool()
            if self.cfg.causal and attn_mask is None:
                m = m.tril()
            kw["attention_mask"] = m.expand(B, 1, L, L) if m.dim() == 2 else m
        if positions is not None:
            kw["position_ids"] = positions.expand(B, L)
        logits = self.hf(input_ids=ids, **kw).logits
        if self.cfg.shift:  # Dream: the prediction for token i sits at i − 1; the first position keeps its own
            idx = torch.arange(-1, L - 1, device=x.device) if prev is None else prev.to(x.device)
            logits = torch.cat([logits[:, :1], logits], 1)[:, idx + 1]
        if logits.shape[-1] >= V:
            logits = logits[..., :V]
        else:
            logits = torch.cat([logits, logits.new_full((B, L, V - logits.shape[-1]), float("-inf"))], -1)
        return logits if select is None else logits[select]
