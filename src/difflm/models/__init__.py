"""Denoiser networks (backbones), each registering itself by ``model.type``: ``transformer`` (difflm's own) and
``llama`` (Llama architecture, for pretrained weights)."""

from .llama import Llama, LlamaConfig
from .transformer import KVCache, Transformer, TransformerConfig

__all__ = ["KVCache", "Llama", "LlamaConfig", "Transformer", "TransformerConfig"]
