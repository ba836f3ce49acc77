"""Mixed precision: bf16 autocast where the hardware runs it natively, float32 elsewhere.

bf16 matrix products are fast on GPUs with bf16 units and on CPUs with AVX-512 (oneDNN's bf16 kernels, with
AVX512-BF16/AMX for the fastest); on an AVX2-only CPU PyTorch emulates them, about 100x slower than float32.
Asking for bf16 there would turn a minutes-long run into hours, so ``autocast`` falls back to float32 and says so
once.
"""

from __future__ import annotations

import functools
import sys
from contextlib import AbstractContextManager, nullcontext

import torch


@functools.cache
def bf16_is_native(device_type: str) -> bool:
    """Whether bf16 matrix products run natively (not emulated) on this kind of device."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        if probe is not None:
            try:
                return bool(probe())
            except RuntimeError:
                pass
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return False


@functools.cache
def _warn_fallback(device_type: str) -> None:
    print(f"difflm: note: this {device_type} has no native bf16 matrix units (emulated bf16 is ~100x slower); "
          "running in float32 instead", file=sys.stderr)


def use_bf16(device_type: str, requested: bool) -> bool:
    """bf16 if it was asked for and the device runs it natively; a one-time notice when it falls back."""
    if requested and not bf16_is_native(device_type):
        _warn_fallback(device_type)
        return False
    return requested


def autocast(device: torch.device | str, bf16: bool) -> AbstractContextManager:
    """bf16 autocast on ``device`` when requested and native, else a no-op context (float32)."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if use_bf16(kind, bf16) else nullcontext()
