"""Denoiser networks (backbones), each registering itself by ``model.type``: ``transformer`` (difflm's own),
``llama`` (Llama architecture, for pretrained weights), ``bert`` (BERT encoders: DiffusionBERT) and ``dit`` (the
published MDLM / SEDD / BD3-LM network)."""

from .bert import Bert, BertConfig
from .dit import DiT, DiTConfig
from .llama import Llama, LlamaConfig
from .transformer import KVCache, Transformer, TransformerConfig

__all__ = ["Bert", "BertConfig", "DiT", "DiTConfig", "KVCache", "Llama", "LlamaConfig", "Transformer",
           "TransformerConfig"]
