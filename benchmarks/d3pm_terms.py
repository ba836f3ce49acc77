"""Where a trained D3PM's bound goes: T·KL_t and the auxiliary cross-entropy −log p̃_θ(x0 | x_t) at 20 evenly
spaced steps t, for the trained network and for a reference p̃ that ignores x_t (the training unigram distribution).

    python benchmarks/d3pm_terms.py benchmarks/out/runs/ptb-d3pm-uniform

If the trained network's bound is above the unigram reference's while its cross-entropy is far lower, the
hybrid loss's CE term has taught p̃ = p(x0 | x_t), which eq. 4 of D3PM combines with Q_t[·, x_t] and so counts
x_t's evidence twice (see the caveat in difflm/diffusion/d3pm.py).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import Tensor, nn

from difflm.data import build_dataset
from difflm.pipeline import DiffusionLM
from difflm.precision import autocast


class UnigramDenoiser(nn.Module):
    """p̃(x0 | x_t) = the training unigram distribution whatever x_t: logits (B, L, V) or (M, V) at ``select``."""

    def __init__(self, log_probs: Tensor) -> None:
        super().__init__()
        self.log_probs = log_probs

    def forward(self, x: Tensor, t: Tensor | None = None, select: Tensor | None = None) -> Tensor:
        out = self.log_probs.expand(*x.shape, -1)
        return out[select] if select is not None else out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--rows", type=int, default=16, help="validation rows")
    ap.add_argument("--repeats", type=int, default=4, help="x_t draws per step (at shifted steps)")
    a = ap.parse_args()
    lm = DiffusionLM.from_pretrained(a.run_dir, device="cpu")
    proc = lm.process
    if proc.family != "d3pm":
        raise SystemExit(f"{a.run_dir} is a {proc.family} model, not D3PM")
    counts = np.bincount(np.asarray(build_dataset(lm.run.data, lm.tokenizer, "train").tokens[:]).ravel(),
                         minlength=proc.vocab_size)
    c = torch.tensor(counts, dtype=torch.float32) + 0.5
    batch = build_dataset(lm.run.data, lm.tokenizer, "valid").batch(list(range(a.rows)))
    n = batch.loss_mask.sum()
    stride = max(1, proc.T // 20)
    grid = list(range(1, proc.T + 1, stride))
    shift = max(1, stride // a.repeats)  # repeat r draws its x_t at step k + r·shift, inside the stride
    for name, model in (("unigram p̃ (ignores x_t)", UnigramDenoiser(torch.log(c / c.sum()))), ("trained", lm.model)):
        g = torch.Generator().manual_seed(0)
        kl = np.zeros(len(grid))
        ce = np.zeros(len(grid))
        for rep in range(a.repeats):
            for i, k0 in enumerate(grid):
                k = torch.full((a.rows,), min(proc.T, k0 + rep * shift), dtype=torch.long)
                xt = proc.corrupt(batch, k, g)
                with torch.no_grad(), autocast("cpu", True):
                    kl_t, ce_t = proc.step_terms(model, batch.tokens, xt, k, batch.loss_mask)
                kl[i] += float(kl_t.sum() / n) / a.repeats
                ce[i] += float(ce_t.sum() / n) / a.repeats
        prior = float(proc.prior_terms(batch).sum() / n)
        print(f"{name}: bound ≈ {proc.T * kl.mean() + prior:.3f} nats/token (prior term {prior:.4f})")
        print("  t      " + " ".join(f"{k:>6d}" for k in grid))
        print("  T·KL_t " + " ".join(f"{proc.T * v:6.2f}" for v in kl))
        print("  CE_t   " + " ".join(f"{v:6.2f}" for v in ce))


if __name__ == "__main__":
    main()
