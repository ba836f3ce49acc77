"""What every sampler returns and reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..diffusion.base import Process
from ..errors import DiffLMError
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
    """

    name = "base"
    families: tuple[str, ...] = ()

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
