"""Samplers (reverse processes) and conditioning; ``get_sampler`` checks the sampler fits the family."""

from __future__ import annotations

from ..diffusion.base import Process
from ..errors import DiffLMError
from .autoregressive import AutoregressiveSampler
from .base import SampleOutput, Sampler, StepInfo
from .conditioning import Conditioning
from .masked import MaskedAncestral, MaskedCached

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (MaskedAncestral, MaskedCached, AutoregressiveSampler)
}
DEFAULT_SAMPLER = {"masked": "ancestral", "autoregressive": "autoregressive"}

__all__ = ["Conditioning", "SampleOutput", "Sampler", "StepInfo", "get_sampler", "SAMPLERS"]


def get_sampler(name: str | None, process: Process) -> Sampler:
    """The sampler called ``name`` (None: the family's default), or a clear error if it does not fit."""
    name = name or DEFAULT_SAMPLER[process.family]
    if name not in SAMPLERS:
        raise DiffLMError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    cls = SAMPLERS[name]
    if process.family not in cls.families:
        fits = sorted(n for n, c in SAMPLERS.items() if process.family in c.families)
        raise DiffLMError(
            f"sampler {name!r} does not fit a {process.family} model; use one of: {', '.join(fits)}"
        )
    return cls()
