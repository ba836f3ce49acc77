"""Samplers (reverse processes) and conditioning; ``get_sampler`` checks the sampler fits the family."""

from __future__ import annotations

from ..diffusion.base import Process
from ..errors import DiffLMError
from .autoregressive import AutoregressiveSampler
from .base import SampleOutput, Sampler, StepInfo
from .block import BlockSampler
from .conditioning import Conditioning
from .confidence import ConfidenceDecoding, ThresholdDecoding
from .gaussian import DDIM, DDPM, DPMSolver
from .graph import D3PMAncestral, SEDDAnalytic, SEDDEuler, UniformAncestral
from .masked import FirstHitting, MaskedAncestral, MaskedCached, ReMDM

_ALL = (MaskedAncestral, MaskedCached, FirstHitting, ReMDM, ConfidenceDecoding, ThresholdDecoding,
        UniformAncestral, D3PMAncestral, SEDDAnalytic, SEDDEuler, AutoregressiveSampler, DDPM, DDIM, DPMSolver,
        BlockSampler)
SAMPLER_NAMES = sorted({c.name for c in _ALL})
DEFAULT_SAMPLER = {"masked": "ancestral", "block": "block", "uniform": "ancestral", "sedd": "analytic",
                   "d3pm": "ancestral", "gaussian": "ddpm", "autoregressive": "autoregressive"}

__all__ = ["Conditioning", "SampleOutput", "Sampler", "StepInfo", "get_sampler", "sampler_fits", "SAMPLER_NAMES"]


def sampler_fits(name: str, process: Process) -> bool:
    """Whether a sampler called ``name`` exists for the process's family."""
    return any(c.name == name and process.family in c.families for c in _ALL)


def get_sampler(name: str | None, process: Process, **options) -> Sampler:
    """The sampler called ``name`` (None: the family's default), or a clear error if it does not fit;
    ``options`` go to its constructor (e.g. ``eta``, ``clamp`` for the Gaussian samplers)."""
    name = name or DEFAULT_SAMPLER[process.family]
    known = {c.name for c in _ALL}
    if name not in known:
        raise DiffLMError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(known))}")
    cls = next((c for c in _ALL if c.name == name and process.family in c.families), None)
    if cls is None:
        fits = sorted(c.name for c in _ALL if process.family in c.families)
        raise DiffLMError(
            f"sampler {name!r} does not fit a {process.family} model; use one of: {', '.join(fits)}"
        )
    try:
        return cls(**options)
    except TypeError:
        raise DiffLMError(f"sampler {name!r} takes no option {', '.join(sorted(options))}") from None
