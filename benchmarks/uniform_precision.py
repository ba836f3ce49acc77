"""Uniform diffusion's bound terms computed from float32 log-probabilities (as a network gives them) against the
float64 formula, weighted by σ(t) = −α'/α as the bound weighs them, at times approaching 1 (issue 20).

    python benchmarks/uniform_precision.py [--vocab 10000]
"""

from __future__ import annotations

import argparse
import math

import torch

from difflm.diffusion import UniformDiffusion


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=10000)
    a = ap.parse_args()
    V = a.vocab
    proc = UniformDiffusion(V + 2, V, V + 1)
    g = torch.Generator().manual_seed(0)
    B, L = 8, 64
    logits = torch.randn(B, L, V + 2, generator=g) * 3  # a random x0-predictor, far from the data
    logits[..., V:] = -math.inf
    lp = torch.log_softmax(logits, -1)
    lp64 = torch.log_softmax(lp.double(), -1)
    x0 = torch.randint(0, V, (B, L), generator=g)
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, V, (B, L), generator=g))
    print("| t | largest error (nats) | largest term |\n|---|---|---|")
    for t in (0.5, 0.9, 0.999, 0.99999):
        tt = torch.full((B,), t, dtype=torch.float64)
        alpha = proc.schedule.alpha(tt)
        w = (-proc.schedule.alpha_prime(tt) / alpha)[:, None]
        f32 = proc.graph.score_entropy_from_x0(lp, xt, x0, alpha) * w
        ref = proc.graph.score_entropy(proc.graph.exact_log_score_from_x0(lp64, xt, alpha), xt, x0, alpha) * w
        print(f"| {t} | {float((f32 - ref).abs().max()):.1e} | {float(ref.abs().max()):.0f} |")


if __name__ == "__main__":
    main()
