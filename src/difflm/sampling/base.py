"""What every sampler returns and reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
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


@dataclass
class Trajectory:
    """Rows in flight through a stepwise sampler, each on its own clock (continuous batching: rows that start
    later join rows already part-way down their chain). Every field is per row, so ``cat`` and ``take`` move
    rows between batches without changing any row's draws.

    x: (B, L) the current state; cond: what is given; k: (B,) steps left (the next step goes from k/steps to
    (k−1)/steps); nfe: (B,) network calls so far; seed, rows: (B,) the keys of each row's random streams;
    state: a sampler's own per-row tensors (first dimension B), e.g. a cache."""

    x: Tensor
    cond: Conditioning
    k: Tensor
    nfe: Tensor
    seed: Tensor
    rows: Tensor
    state: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def done(self) -> Tensor:
        """(B,) True for rows whose chain has reached t = 0."""
        return self.k == 0

    def take(self, idx: Tensor) -> Trajectory:
        """The rows at ``idx`` (a (B,) bool mask or int indices)."""
        return Trajectory(**{f.name: _take(getattr(self, f.name), idx) for f in fields(self)})

    @staticmethod
    def cat(parts: list[Trajectory]) -> Trajectory:
        """Rows of several trajectories as one batch (same sampler, steps and row length)."""
        return Trajectory(**{f.name: _cat([getattr(p, f.name) for p in parts]) for f in fields(Trajectory)})

    def replace(self, **changes) -> Trajectory:
        return replace(self, **changes)


def on_rows(model: nn.Module, idx: Tensor) -> nn.Module:
    """The network for a subset ``idx`` of the batch's rows: a wrapper that holds per-row data (guidance's
    source positions) narrowed to them, any other network as it is."""
    rows = getattr(model, "rows", None)
    return rows(idx) if callable(rows) else model


def check_stop_at_eos(stop: bool, process) -> None:
    """A one-line error when ``--stop-at-eos`` is asked of a model whose tokenizer has no [EOS] to stop at."""
    if stop and process.eos_id is None:
        raise DiffLMError("--stop-at-eos needs a tokenizer with an [EOS] token")


def _take(v, idx: Tensor):
    if isinstance(v, Conditioning):
        return v.rows(idx)
    if isinstance(v, dict):
        return {k: t[idx] for k, t in v.items()}
    return v[idx]


def _cat(vs: list):
    if isinstance(vs[0], Conditioning):
        images = None if vs[0].images is None else torch.cat([v.images for v in vs])
        return Conditioning(torch.cat([v.tokens for v in vs]), torch.cat([v.fixed for v in vs]), images)
    if isinstance(vs[0], dict):
        return {k: torch.cat([v[k] for v in vs]) for k in vs[0]}
    return torch.cat(vs)


class Sampler:
    """A reverse process: ``sampler(model, process, cond, steps=..., seed=...)`` -> SampleOutput.

    ``rows`` are the sequences' global indices (default 0..B−1): a sequence's random numbers depend only
    on (seed, row), so results do not change with batch size.

    A sampler declares itself (``registry.register_sampler``): ``name``; the ``families`` it fits;
    ``Options``, a dataclass of its own options (``registry.option`` fields with help text — the CLI makes
    flags of them and checks them); ``bench``, the option settings ``bench-sampling`` runs (empty: not
    benchmarked); ``step_free`` when its cost and output do not depend on ``steps``. ``Sampler(**options)``
    builds ``self.options``; an unknown option is a one-line error naming the real ones.

    A ``stepwise`` sampler also runs one step at a time on rows that each keep their own clock: ``begin``
    makes a ``Trajectory`` of new rows, ``advance`` moves every row one step; rows may join (``Trajectory.cat``)
    or leave (``take``) between steps, and each row's result is what ``__call__`` gives it (``difflm serve``'s
    continuous batching).
    """

    name: ClassVar[str] = "base"
    families: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    bench: ClassVar[tuple[dict, ...]] = ({},)
    step_free: ClassVar[bool] = False
    stepwise: ClassVar[bool] = False
    unfit: ClassVar[str] = ""  # why ``fits`` refuses a model, and what to use instead

    def __init__(self, **options) -> None:
        self.options = make_options(self.Options, options, f"sampler {self.name!r}")

    @classmethod
    def fits(cls, process: Process) -> bool:
        """Whether this sampler can decode a model of this process (beyond its family: e.g. one that needs a
        process option); where it cannot, ``unfit`` says why and what to use instead."""
        return True

    @classmethod
    def free_of_steps(cls, options: dict) -> bool:
        """Whether, with these options, cost and output do not depend on ``steps`` (default: ``step_free``)."""
        return cls.step_free

    def __call__(
        self, model: nn.Module, process: Process, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        raise NotImplementedError

    def begin(self, process: Process, cond: Conditioning, *, steps: int, seed: int | Tensor = 0,
              rows: Tensor | None = None) -> Trajectory:
        """New rows at t = 1 (stepwise samplers): the start state, ``steps`` steps to go, no calls spent."""
        rows = self.default_rows(cond, rows, steps)
        B = cond.shape[0]
        dev = cond.tokens.device
        return Trajectory(
            x=self.start(process, cond), cond=cond, k=torch.full((B,), steps, dtype=torch.long, device=dev),
            nfe=torch.zeros(B, dtype=torch.long, device=dev),
            seed=torch.as_tensor(seed, dtype=torch.long, device=dev).expand(B).clone(), rows=rows,
            state=self.initial_state(process, cond))

    def start(self, process: Process, cond: Conditioning) -> Tensor:
        """The state x at t = 1 (B, L)."""
        raise NotImplementedError

    def initial_state(self, process: Process, cond: Conditioning) -> dict[str, Tensor]:
        """A stepwise sampler's own per-row tensors for new rows (none by default)."""
        return {}

    def advance(self, model: nn.Module, process: Process, traj: Trajectory, *, steps: int,
                temperature: float = 1.0, top_p: float = 1.0) -> Trajectory:
        """Every unfinished row one step down its own chain, k → k − 1 (stepwise samplers)."""
        raise NotImplementedError

    def run_stepwise(self, model: nn.Module, process: Process, cond: Conditioning, *, steps: int,
                     seed: int | Tensor = 0, rows: Tensor | None = None, temperature: float = 1.0,
                     top_p: float = 1.0, on_step: OnStep | None = None) -> SampleOutput:
        """``__call__`` for a stepwise sampler: begin, then ``steps`` advances, reporting each."""
        traj = self.begin(process, cond, steps=steps, seed=seed, rows=rows)
        for k in range(steps, 0, -1):
            traj = self.advance(model, process, traj, steps=steps, temperature=temperature, top_p=top_p)
            if on_step is not None:
                on_step(StepInfo(k, steps, k / steps, (k - 1) / steps, traj.x, traj.nfe.clone()))
        return SampleOutput(traj.x, traj.nfe)

    @staticmethod
    def default_rows(cond: Conditioning, rows: Tensor | None, steps: int | None = None) -> Tensor:
        """The rows' global indices (B,), 0..B-1 unless given (they key the random streams); checks a step
        budget when one is given."""
        if steps is not None and steps < 1:
            raise DiffLMError("--steps must be at least 1")
        return torch.arange(cond.shape[0], device=cond.tokens.device) if rows is None else rows
