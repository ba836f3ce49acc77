"""Noise schedules: the signal kept at time t, α(t), and its derivative α'(t).

Time runs over t ∈ [0, 1], t = 0 clean, t = 1 fully noised. For the discrete families α(t) is the
probability that a token is still intact at time t. A schedule is a pure function of t: no state but
its parameters.

Discrete processes need α(1) = 0 exactly, or the bound would miss a prior term; ``terminal_zero``
rescales a schedule that stops short of zero, α̃(t) = (α(t) − α(1)) / (1 − α(1)), which keeps its shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import DiffLMError


class Schedule:
    """α(t) and α'(t) for t ∈ [0, 1]; subclasses implement ``_alpha`` and ``_alpha_prime``."""

    name = "base"

    def __init__(self, terminal_zero: bool = True) -> None:
        self.terminal_zero = terminal_zero

    def _alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _alpha_prime(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _alpha_one(self) -> float:
        return float(self._alpha(torch.ones((), dtype=torch.float64)))

    def alpha(self, t: Tensor) -> Tensor:
        """Signal kept at time t; same shape and dtype as t."""
        a = self._alpha(t)
        if self.terminal_zero:
            a1 = self._alpha_one()
            a = (a - a1) / (1.0 - a1)
        return a

    def alpha_prime(self, t: Tensor) -> Tensor:
        """dα/dt at time t (≤ 0)."""
        d = self._alpha_prime(t)
        if self.terminal_zero:
            d = d / (1.0 - self._alpha_one())
        return d

    def to_dict(self) -> dict:
        return {"name": self.name}


class LogLinear(Schedule):
    """MDLM's log-linear noise σ(t) = −log(1 − (1−ε)t), i.e. α(t) = 1 − (1−ε)t (MDLM §3.5)."""

    name = "loglinear"

    def __init__(self, eps: float = 0.0, terminal_zero: bool = True) -> None:
        super().__init__(terminal_zero)
        self.eps = eps

    def _alpha(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1.0 - self.eps))

    def to_dict(self) -> dict:
        return {"name": self.name, "eps": self.eps}


class Linear(Schedule):
    """Noise σ(t) linear in t (MDLM's LinearNoise): α(t) = exp(−(σ_min + t(σ_max − σ_min)))."""

    name = "linear"

    def __init__(self, sigma_min: float = 0.0, sigma_max: float = 10.0, terminal_zero: bool = True) -> None:
        super().__init__(terminal_zero)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-(self.sigma_min + t * (self.sigma_max - self.sigma_min)))

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return -(self.sigma_max - self.sigma_min) * self._alpha(t)

    def to_dict(self) -> dict:
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class Cosine(Schedule):
    """α(t) = ε + (1−ε)·cos(πt/2) (MDLM's CosineNoise; Nichol & Dhariwal's cosine shape)."""

    name = "cosine"

    def __init__(self, eps: float = 1e-3, terminal_zero: bool = True) -> None:
        super().__init__(terminal_zero)
        self.eps = eps

    def _alpha(self, t: Tensor) -> Tensor:
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def to_dict(self) -> dict:
        return {"name": self.name, "eps": self.eps}


class Polynomial(Schedule):
    """α(t) = 1 − t^w (MD4's polynomial schedule; w = 1 is linear in α)."""

    name = "polynomial"

    def __init__(self, exponent: float = 1.0, terminal_zero: bool = True) -> None:
        super().__init__(terminal_zero)
        self.exponent = exponent

    def _alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t**self.exponent

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return -self.exponent * t ** (self.exponent - 1.0)

    def to_dict(self) -> dict:
        return {"name": self.name, "exponent": self.exponent}


class Geometric(Schedule):
    """SEDD's geometric noise σ̄(t) = σ_min^{1−t} σ_max^t (Lou et al. 2024, §5), shifted by σ_min so that
    α(0) = exp(−(σ̄(t) − σ_min)) is exactly 1; the rate σ(t) = σ̄(t)·log(σ_max/σ_min) is unchanged."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0, terminal_zero: bool = True) -> None:
        super().__init__(terminal_zero)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def _total(self, t: Tensor) -> Tensor:
        return self.sigma_min ** (1.0 - t) * self.sigma_max**t

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.sigma_min - self._total(t))

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return -self._alpha(t) * self._total(t) * math.log(self.sigma_max / self.sigma_min)

    def to_dict(self) -> dict:
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (LogLinear, Linear, Cosine, Polynomial, Geometric)
}


def build_schedule(spec: str | dict, terminal_zero: bool = True) -> Schedule:
    """Build a schedule from its name or a dict ``{"name": ..., **params}``."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in SCHEDULES:
        raise DiffLMError(f"unknown schedule {name!r}; choose one of {', '.join(sorted(SCHEDULES))}")
    try:
        return SCHEDULES[name](**spec, terminal_zero=terminal_zero)
    except TypeError as e:
        raise DiffLMError(f"bad parameters for schedule {name!r}: {e}") from None


# -- discrete-time β schedules (D3PM, Austin et al. 2021, §4 and App. A) --------------------------------
BETA_SCHEDULES = ("linear", "cosine", "jsd")


def beta_schedule(name: str, steps: int, beta_min: float = 1e-4, beta_max: float = 0.02) -> Tensor:
    """β_1..β_T (T,) float64 for a T-step discrete process.

    linear: β_t from beta_min to beta_max (Ho et al. 2020; D3PM's discretized-Gaussian models).
    cosine: β_t = 1 − ᾱ_t/ᾱ_{t−1} with ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008
            (Nichol & Dhariwal 2021, as Hoogeboom et al. 2021 use for uniform noise; D3PM-uniform).
    jsd:    β_t = 1/(T − t + 1) (Sohl-Dickstein et al. 2015; D3PM-absorbing): ᾱ_t = 1 − t/T exactly.
    """
    T = int(steps)
    if T < 1:
        raise DiffLMError(f"a discrete process needs steps ≥ 1, got {steps}")
    t = torch.arange(1, T + 1, dtype=torch.float64)
    if name == "linear":
        return torch.linspace(beta_min, beta_max, T, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(0.0, 1.0)
    if name == "jsd":
        return 1.0 / (T - t + 1)
    raise DiffLMError(f"unknown β schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def betas_from_alpha(schedule: Schedule, steps: int) -> Tensor:
    """β_t = 1 − α(t/T)/α((t−1)/T): a continuous schedule sampled on T steps, so ᾱ_t = α(t/T) (T,) float64."""
    a = schedule.alpha(torch.arange(steps + 1, dtype=torch.float64) / steps)
    ratio = torch.where(a[:-1] > 0, a[1:] / a[:-1].clamp_min(1e-300), torch.zeros_like(a[1:]))
    return (1 - ratio).clamp(0.0, 1.0)
