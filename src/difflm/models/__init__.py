"""Denoiser networks: one transformer backbone shared by every family."""

from .transformer import KVCache, Transformer, TransformerConfig

__all__ = ["KVCache", "Transformer", "TransformerConfig"]
