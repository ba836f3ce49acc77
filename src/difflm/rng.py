"""Counter-based random numbers: u = hash(seed, sequence, step, position, stream).

A sequence's noise depends only on its own index, never on the batch it is sampled in, so the same seed
gives the same text whatever the batch size or chunking (reference fast decoders break under batching).
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for int64 x < 2³², in two halves so no product overflows int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 integer hash on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_rows(seed: int | Tensor, idx: Tensor) -> int | Tensor:
    """The seed(s) of the rows ``idx`` of a batch, for a sampler that draws for some rows only: one seed per row
    (B,) is indexed with ``idx``; one seed for the batch stays as it is."""
    if isinstance(seed, Tensor) and seed.numel() > 1:
        return seed.reshape(-1)[idx.to(seed.device)]
    return seed


def uniform(seed: int | Tensor, rows: Tensor, step: int | Tensor, length: int, stream: int = 0) -> Tensor:
    """Float64 uniforms in [0, 1) with 53 random bits: (len(rows), length).

    seed: one seed, or one per row (B,) int64 — rows of different requests batched together (``difflm serve``)
    draw exactly what each would draw alone; rows: (B,) int64 sequence indices; step: the sampler's step, or one
    per row (B,) (rows on their own clocks, continuous batching); stream separates independent uses.
    """
    device = rows.device
    pos = torch.arange(length, device=device, dtype=torch.int64)[None, :]
    s = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(-1, 1)  # (1, 1) or (B, 1)
    key = hash32((s & _M32) ^ hash32(((s >> 32) & _M32) ^ stream * 0x632BE5AB))
    h = hash32(key ^ hash32(rows.long()[:, None]))
    k = torch.as_tensor(step, dtype=torch.int64, device=device).reshape(-1, 1)  # (1, 1) or (B, 1)
    h = hash32(h ^ hash32(k + 0x68E31DA4))
    a = hash32(h ^ hash32(pos * 2))
    b = hash32(h ^ hash32(pos * 2 + 1))
    return ((a >> 6).double() * 134217728.0 + (b >> 5).double()) / 9007199254740992.0  # (26+27 bits)/2^53
