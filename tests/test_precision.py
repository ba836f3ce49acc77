"""bf16 autocast only where the device runs bf16 natively; float32, said once, where it would be emulated."""

from __future__ import annotations

import pytest
import torch

from difflm import precision


@pytest.fixture
def fresh(monkeypatch):
    precision._warn_fallback.cache_clear()
    yield monkeypatch
    precision._warn_fallback.cache_clear()


def _matmul_dtype(bf16: bool) -> torch.dtype:
    with precision.autocast("cpu", bf16):
        return (torch.ones(4, 4) @ torch.ones(4, 4)).dtype


def test_native_bf16_autocasts(fresh, capsys):
    fresh.setattr(precision, "bf16_is_native", lambda kind: True)
    assert _matmul_dtype(True) == torch.bfloat16
    assert _matmul_dtype(False) == torch.float32
    assert capsys.readouterr().err == ""


def test_emulated_bf16_falls_back_to_float32_with_one_notice(fresh, capsys):
    fresh.setattr(precision, "bf16_is_native", lambda kind: False)
    assert _matmul_dtype(True) == torch.float32
    assert _matmul_dtype(True) == torch.float32
    err = capsys.readouterr().err
    assert err.count("float32 instead") == 1 and "\n" == err[-1] and err.count("\n") == 1


def test_probe_agrees_with_the_cpu_capability():
    """oneDNN's bf16 kernels need at least avx512_core: a CPU PyTorch runs at AVX2 or below is never native."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        assert precision.bf16_is_native("cpu") is False
    assert precision.bf16_is_native("meta") is False
