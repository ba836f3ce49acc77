"""One module per family; ``build_process`` selects one from the config's ``process.type``."""

from __future__ import annotations

import inspect

from ..errors import DiffLMError
from .autoregressive import Autoregressive
from .base import Batch, Process, low_discrepancy_uniform
from .block import BlockDiffusion
from .d3pm import D3PM
from .gaussian import GaussianDiffusion
from .graphs import Graph
from .masked import MaskedDiffusion
from .sedd import ScoreEntropy
from .uniform import UniformDiffusion

__all__ = ["Autoregressive", "Batch", "BlockDiffusion", "D3PM", "GaussianDiffusion",
           "Graph", "MaskedDiffusion", "Process", "ScoreEntropy", "UniformDiffusion",
           "build_process", "low_discrepancy_uniform"]

FAMILIES = ("masked", "block", "uniform", "sedd", "d3pm", "gaussian", "autoregressive")


def build_process(cfg: dict, *, vocab_size: int, special: dict[str, int], length_prior=None) -> Process:
    """cfg: the config's ``process`` section; special: token ids of pad/mask/bos/eos."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "masked")
    if kind == "autoregressive":
        if cfg:
            raise DiffLMError(f"process.type autoregressive takes no options, got {sorted(cfg)}")
        return Autoregressive(special["bos"], special["pad"], special["mask"])
    classes = {"masked": MaskedDiffusion, "uniform": UniformDiffusion, "sedd": ScoreEntropy, "d3pm": D3PM,
               "gaussian": GaussianDiffusion, "block": BlockDiffusion}
    if kind not in classes:
        raise DiffLMError(f"unknown process.type {kind!r}; choose one of {', '.join(FAMILIES)}")
    cls = classes[kind]
    params = set(inspect.signature(cls).parameters)
    known = params - {"vocab_size", "mask_id", "pad_id", "bos_id", "eos_id", "length_prior"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise DiffLMError(
            f"process.type {kind} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}"
        )
    if "eos_id" in params:  # block diffusion stops generating at [EOS]
        cfg["eos_id"] = special.get("eos")
    return cls(vocab_size, special["mask"], special["pad"], special.get("bos"), length_prior=length_prior, **cfg)
