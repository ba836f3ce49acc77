"""Samplers (reverse processes) and conditioning. Each sampler module registers its classes
(``registry.register_sampler``); ``get_sampler`` finds the one a family's model can use."""

from __future__ import annotations

# isort: off
# the sampler modules register their classes on import; this order is bench-sampling's row order
from . import masked, confidence, speculative, beam, graph, gaussian, block, edit, editflow, autoregressive  # noqa: F401
# isort: on
from .. import registry
from ..diffusion.base import Process
from ..errors import DiffLMError
from .base import SampleOutput, Sampler, StepInfo
from .conditioning import Conditioning

__all__ = ["Conditioning", "SampleOutput", "Sampler", "StepInfo", "get_sampler", "sampler_fits", "sampler_names"]

sampler_names = registry.sampler_names


def sampler_fits(name: str, process: Process) -> bool:
    """Whether a sampler called ``name`` exists for the process's family and can decode its models."""
    return any(c.name == name and c.fits(process) for c in registry.samplers(process.family))


def get_sampler(name: str | None, process: Process, **options) -> Sampler:
    """The sampler called ``name`` (None: the family's default), or a one-line error if it does not fit;
    ``options`` are its declared options (e.g. ``eta``, ``clamp`` for the Gaussian samplers)."""
    cls = registry.sampler_class(name or type(process).default_sampler, process.family)
    if not cls.fits(process):
        raise DiffLMError(cls.unfit)
    return cls(**options)
