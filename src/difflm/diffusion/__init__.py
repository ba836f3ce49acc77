"""One module per family, each registering its Process class (``registry.register_family``); ``build_process``
selects one by the config's ``process.type``."""

from __future__ import annotations

from collections.abc import Collection

# isort: off
# each module registers its family on import; this order is the order families are listed in
from .masked import MaskedDiffusion
from .block import BlockDiffusion
from .uniform import UniformDiffusion
from .sedd import ScoreEntropy
from .d3pm import D3PM
from .gaussian import GaussianDiffusion
from .edit import EditDiffusion
from .editflow import EditFlow
from .autoregressive import Autoregressive
# isort: on
from .. import registry
from .base import Batch, Process, low_discrepancy_uniform
from .graphs import Graph

__all__ = ["Autoregressive", "Batch", "BlockDiffusion", "D3PM", "EditDiffusion", "EditFlow", "GaussianDiffusion",
           "Graph", "MaskedDiffusion", "Process", "ScoreEntropy", "UniformDiffusion",
           "build_process", "low_discrepancy_uniform"]


def build_process(cfg, *, vocab_size: int, special: dict[str, int], length_prior=None,
                  word_starts: Collection[int] = (), never: Collection[int] = ()) -> Process:
    """cfg: the config's ``process`` section (a mapping with ``type``, or a family's Options instance);
    special: token ids of pad/mask/bos/eos; word_starts: the ids that begin a word (``Tokenizer.word_starts``);
    never: more ids that are never data (``Tokenizer.unreachable_ids``)."""
    from ..config import process_options

    options = process_options(cfg)
    return registry.family(options.family).from_options(options, vocab_size=vocab_size, special=special,
                                                        length_prior=length_prior, word_starts=word_starts,
                                                        never=never)
