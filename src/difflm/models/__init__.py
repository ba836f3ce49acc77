"""Denoiser networks (backbones), each registering itself by ``model.type``: ``transformer`` (difflm's own),
``llama`` (Llama architecture, for pretrained weights), ``bert`` (BERT encoders: DiffusionBERT), ``dit`` (the
published MDLM / SEDD / BD3-LM network) and ``hf`` (LLaDA / Dream run through transformers)."""

from .bert import Bert, BertConfig
from .dit import DiT, DiTConfig
from .hf import HFDenoiser, HFDenoiserConfig
from .llama import Llama, LlamaConfig
from .transformer import KVCache, Transformer, TransformerConfig

__all__ = ["Bert", "BertConfig", "DiT", "DiTConfig", "HFDenoiser", "HFDenoiserConfig", "KVCache", "Llama",
           "LlamaConfig", "Transformer", "TransformerConfig"]
