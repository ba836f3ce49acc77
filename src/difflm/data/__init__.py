"""Tokenizers and datasets."""

from .corpora import load_lines, read_text
from .datasets import TokenDataset, build_dataset
from .tokenizers import Tokenizer, build_tokenizer

__all__ = ["Tokenizer", "TokenDataset", "build_dataset", "build_tokenizer", "load_lines", "read_text"]
