"""Diffusion-LM: does DPM-Solver++(2M) at 20 steps sample what DDPM at 1000 steps samples, on the same
trained model? Trains the Gaussian family (16-dim embeddings, VDM bound) on the Markov source of the test
suite for 600 steps, draws 400 sequences with each sampler, and compares bigram distributions: the TV
between two DDPM-1000 runs with different seeds is the sampling-noise floor.

    python benchmarks/gaussian_solver.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import markov  # noqa: E402
from conftest import markov_run  # noqa: E402

from difflm.pipeline import DiffusionLM  # noqa: E402
from difflm.training.trainer import Trainer  # noqa: E402

RUNS = [("ddpm", 1000, 0), ("ddpm", 1000, 2), ("dpm-solver", 20, 1), ("ddpm", 20, 1), ("ddim", 20, 1),
        ("dpm-solver", 10, 1), ("dpm-solver", 3, 1)]


def main() -> None:
    d = Path(tempfile.mkdtemp())
    P = markov.transition_matrix(0)
    markov.write_corpus(d / "train.txt", P, 20000, 16, 1)
    markov.write_corpus(d / "valid.txt", P, 2000, 16, 2)
    proc = {"type": "gaussian", "embed_dim": 16, "loss": "elbo"}
    Trainer(markov_run(d, proc, batch_size=128, lr=2e-3, max_steps=600), d / "g", progress=False).fit()
    lm = DiffusionLM.from_pretrained(d / "g")
    freqs, rows = {}, []
    for name, steps, seed in RUNS:
        t0 = time.time()
        g = lm.generate(400, steps=steps, sampler=name, seed=seed)
        freqs[name, steps, seed] = markov.bigram_freqs(g.texts)
        rows.append((name, steps, seed, markov.bigram_tv(g.texts, P), time.time() - t0))
    ref = freqs[RUNS[0]]
    print("| sampler | steps | seed | bigram TV to the source | bigram TV to DDPM-1000 (seed 0) | seconds (400 seqs) |")
    print("|---|---|---|---|---|---|")
    for name, steps, seed, tv, sec in rows:
        to_ref = 0.5 * float(np.abs(freqs[name, steps, seed] - ref).sum())
        print(f"| {name} | {steps} | {seed} | {tv:.3f} | {to_ref:.3f} | {sec:.1f} |")


if __name__ == "__main__":
    main()
