"""Evaluation: likelihood bounds for every family."""

from .likelihood import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
