"""What every sampler returns and reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..diffusion.base import Process
from ..errors import DiffLMError
from ..registry import NoOptions, make_options
from .conditioning import Conditioning


@dataclass
class StepInfo:
    """Reported after each reverse step: step counts down from ``steps`` to 1 (t -> s)."""

    step: int
    steps: int
    t: float
    s: float
    tokens: Tensor  # (B, L) the current x_s
    nfe: Tensor  # (B,) network calls spent on each sequence so far


@dataclass
class SampleOutput:
    tokens: Tensor  # (B, L)
    nfe: Tensor  # (B,) network calls per sequence


OnStep = Callable[[StepInfo], None]


class Sampler:
    """A reverse process: ``sampler(model, process, cond, steps=..., seed=...)`` -> SampleOutput.

    ``rows`` are the sequences' global indices (default 0..B−1): a sequence's random numbers depend only
    on (seed, row), so results do not change with batch size.

    A sampler declares itself (``registry.register_sampler``): ``name``; the ``families`` it fits;
    ``Options``, a dataclass of its own options (``registry.option`` fields with help text — the CLI makes
    flags of them and checks them); ``bench``, the option settings ``bench-sampling`` runs (empty: not
    benchmarked); ``step_free`` when its cost and output do not depend on ``steps``. ``Sampler(**options)``
    builds ``self.options``; an unknown option is a one-line error naming the real ones.
    """

    name: ClassVar[str] = "base"
    families: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    bench: ClassVar[tuple[dict, ...]] = ({},)
    step_free: ClassVar[bool] = False

    def __init__(self, **options) -> None:
        self.options = make_options(self.Options, options, f"sampler {self.name!r}")

    def __call__(
        self, model: nn.Module, process: Process, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        raise NotImplementedError

    @staticmethod
    def default_rows(cond: Conditioning, rows: Tensor | None, steps: int | None = None) -> Tensor:
        """The rows' global indices (B,), 0..B-1 unless given (they key the random streams); checks a step
        budget when one is given."""
        if steps is not None and steps < 1:
            raise DiffLMError("--steps must be at least 1")
        return torch.arange(cond.shape[0], device=cond.tokens.device) if rows is None else rows
