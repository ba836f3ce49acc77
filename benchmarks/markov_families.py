"""Families on the Markov source of known entropy rate H (the known-distribution tests' setup, 600 steps):
the NELBO's gap to H and the samples' bigram total-variation distance, for process variants given as JSON.

    python benchmarks/markov_families.py                       # the D3PM λ sweep and the Gaussian losses
    python benchmarks/markov_families.py --variants '{"mine": {"type": "uniform"}}' --sampler mine=ancestral

Used for the D3PM hybrid-λ finding in RESULTS.md: with non-absorbing matrices the auxiliary cross-entropy's
optimum p(x0ⁱ | x_t) is not the p(x0ⁱ | x_t without i) that eq. 4 needs, and λ = 0.01 stalls the bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import markov  # noqa: E402
from conftest import MARKOV_L, markov_run  # noqa: E402

from difflm.pipeline import DiffusionLM  # noqa: E402
from difflm.training.trainer import Trainer  # noqa: E402

DEFAULT = {
    "d3pm-uniform λ=0.01 (paper)": ({"type": "d3pm", "transition": "uniform", "steps": 1000}, "ancestral"),
    "d3pm-uniform λ=0.001": ({"type": "d3pm", "transition": "uniform", "steps": 1000, "hybrid_lambda": 0.001},
                             "ancestral"),
    "d3pm-uniform λ=0": ({"type": "d3pm", "transition": "uniform", "steps": 1000, "hybrid_lambda": 0.0}, "ancestral"),
    "gaussian L_simple": ({"type": "gaussian", "embed_dim": 16}, "ddpm"),
    "gaussian VDM bound": ({"type": "gaussian", "embed_dim": 16, "loss": "elbo"}, "ddpm"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=None, help="JSON {name: process section}; default: the built-in set")
    ap.add_argument("--sampler", action="append", default=[], help="name=sampler for --variants")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--sample-steps", default="20,64")
    a = ap.parse_args()
    if a.variants:
        samplers = dict(s.split("=", 1) for s in a.sampler)
        variants = {k: (v, samplers.get(k)) for k, v in json.loads(a.variants).items()}
    else:
        variants = DEFAULT
    d = Path(tempfile.mkdtemp())
    P = markov.transition_matrix(0)
    markov.write_corpus(d / "train.txt", P, 20000, MARKOV_L, 1)
    markov.write_corpus(d / "valid.txt", P, 2000, MARKOV_L, 2)
    H = markov.per_token_entropy(P, MARKOV_L)
    steps = [int(s) for s in a.sample_steps.split(",")]
    print(f"H = {H:.4f} nats/token\n")
    print("| variant | NELBO | 95% CI | gap to H | " + " | ".join(f"bigram TV @{s}" for s in steps) + " | train s |")
    print("|---|---|---|---|" + "---|" * len(steps) + "---|")
    for i, (name, (proc, sampler)) in enumerate(variants.items()):
        t0 = time.time()
        run_dir = d / f"run{i}"
        Trainer(markov_run(d, proc, batch_size=128, lr=2e-3, max_steps=a.steps), run_dir, progress=False).fit()
        train_s = time.time() - t0
        lm = DiffusionLM.from_pretrained(run_dir)
        r = lm.evaluate("valid", samples=4, bf16=False)
        tvs = [markov.bigram_tv(lm.generate(300, steps=s, sampler=sampler, seed=0).texts, P) for s in steps]
        print(f"| {name} | {r.nelbo:.4f} | ± {r.ci95:.4f} | {r.nelbo - H:+.4f} | "
              + " | ".join(f"{tv:.3f}" for tv in tvs) + f" | {train_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
