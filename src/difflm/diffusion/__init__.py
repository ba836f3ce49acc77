"""One module per family; ``build_process`` selects one from the config's ``process.type``."""

from __future__ import annotations

from ..errors import DiffLMError
from .autoregressive import Autoregressive
from .base import Batch, Process, low_discrepancy_uniform
from .graphs import Graph
from .masked import MaskedDiffusion
from .sedd import ScoreEntropy
from .uniform import UniformDiffusion

__all__ = ["Autoregressive", "Batch", "Graph", "MaskedDiffusion", "Process", "ScoreEntropy", "UniformDiffusion",
           "build_process", "low_discrepancy_uniform"]

FAMILIES = ("masked", "uniform", "sedd", "autoregressive")


def build_process(cfg: dict, *, vocab_size: int, special: dict[str, int], length_prior=None) -> Process:
    """cfg: the config's ``process`` section; special: token ids of pad/mask/bos/eos."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "masked")
    if kind == "masked":
        return MaskedDiffusion(
            vocab_size, special["mask"], special["pad"], special.get("bos"), length_prior=length_prior, **cfg
        )
    if kind in ("uniform", "sedd"):
        cls = UniformDiffusion if kind == "uniform" else ScoreEntropy
        return cls(vocab_size, special["mask"], special["pad"], special.get("bos"), length_prior=length_prior, **cfg)
    if kind == "autoregressive":
        if cfg:
            raise DiffLMError(f"process.type autoregressive takes no options, got {sorted(cfg)}")
        return Autoregressive(special["bos"], special["pad"], special["mask"])
    raise DiffLMError(f"unknown process.type {kind!r}; choose one of {', '.join(FAMILIES)}")
