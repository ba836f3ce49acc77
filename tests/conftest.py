"""Shared fixtures: an enumerable toy distribution with its exact denoiser, and tiny models trained on a
Markov source whose entropy is known exactly."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import markov  # noqa: E402

from difflm.config import RunConfig  # noqa: E402
from difflm.pipeline import DiffusionLM  # noqa: E402
from difflm.training.trainer import Trainer  # noqa: E402

# ---- enumerable toy problem: tokens 0..V-1 are data, then [MASK] and [PAD] -----------------------------
TOY_V, TOY_L = 3, 3
TOY_MASK, TOY_PAD = TOY_V, TOY_V + 1


def one_line_error(err: str) -> bool:
    """A user's mistake: exactly one ``difflm: error:`` line on stderr and no traceback. A ``difflm: note:`` (the
    once-per-process float32 fallback notice) is information, not part of the error."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("difflm: note:")]
    return len(lines) == 1 and lines[0].startswith("difflm: error:") and "Traceback" not in err


def toy_distribution(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All V^L sequences (N, L) and a random joint distribution over them (N,), float64."""
    seqs = torch.tensor(list(itertools.product(range(TOY_V), repeat=TOY_L)))
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(len(seqs), generator=g, dtype=torch.float64) ** 3 + 0.01
    return seqs, p / p.sum()


class ExactDenoiser(nn.Module):
    """logits = log p(x0ⁱ = v | visible tokens of x_t), computed by enumeration: the Bayes-optimal
    time-free masked-diffusion network for the toy distribution."""

    def __init__(self, seqs: torch.Tensor, p: torch.Tensor) -> None:
        super().__init__()
        self.seqs, self.p = seqs, p
        self.calls = 0

    def forward(self, x: torch.Tensor, t=None, select=None) -> torch.Tensor:
        if select is not None:
            return self(x, t)[select]
        self.calls += 1
        visible = x != TOY_MASK  # (B, L)
        match = (self.seqs[None] == x[:, None]) | ~visible[:, None]  # (B, N, L)
        w = self.p[None] * match.all(-1)  # (B, N) posterior weights
        post = torch.zeros(x.shape[0], TOY_L, TOY_V + 2, dtype=torch.float64)
        for v in range(TOY_V):
            post[..., v] = (w[:, :, None] * (self.seqs[None] == v)).sum(1)
        post = post / post.sum(-1, keepdim=True)
        return torch.log(post.clamp_min(1e-300)).float()


class ExactScore(nn.Module):
    """The exact concrete score of the toy distribution under a graph (absorbing or uniform), by
    enumeration, in the output form a process expects: "sedd" (log-scores, shifted back when the process
    scales by σ) or "x0" (log p(x0ⁱ | x_t without position i): the x0-prediction whose implied score is exact)."""

    def __init__(self, seqs, p, graph, schedule, form: str, scale_by_sigma: bool = False) -> None:
        super().__init__()
        self.seqs, self.p, self.g, self.schedule, self.form, self.scale = seqs, p, graph, schedule, form, scale_by_sigma
        self.calls = 0

    def forward(self, x, t=None, select=None):
        if select is not None:
            return self(x, t)[select]
        self.calls += 1
        B, L = x.shape
        V = self.g.vocab_size
        a = self.schedule.alpha(t.double())  # (B,)
        n = len(self.seqs)
        lik = self.g.transition_probs(self.seqs[None].expand(B, n, L), a[:, None, None].expand(B, n, L))
        held = lik.gather(-1, x[:, None, :, None].expand(B, n, L, 1)).squeeze(-1)  # (B, n, L)
        out = torch.empty(B, L, V, dtype=torch.float64)
        for i in range(L):
            others = self.p * torch.cat([held[..., :i], held[..., i + 1 :]], -1).prod(-1)  # (B, n)
            if self.form == "x0":
                w = torch.zeros(B, V, dtype=torch.float64).index_add_(1, self.seqs[:, i], others)
                out[:, i] = torch.log(w / w.sum(-1, keepdim=True))
            else:
                pt = (others[..., None] * lik[:, :, i]).sum(1)  # (B, V) p_t(x with position i set to y)
                out[:, i] = torch.log(pt) - torch.log(pt.gather(-1, x[:, i : i + 1]))
                if self.scale:
                    out[:, i] += math.log(self.g.N) + torch.log((1 - a) / a)[:, None]
        return out.float()


def chi2_pvalue(stat: float, df: int) -> float:
    """Upper tail of the chi-square distribution (Wilson–Hilferty approximation)."""
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi2_gof(samples: torch.Tensor, seqs: torch.Tensor, p: torch.Tensor) -> float:
    """p-value of samples (n, L) against the distribution p over seqs (cells with expected count ≥ 5)."""
    code = lambda s: (s * (TOY_V ** torch.arange(TOY_L - 1, -1, -1))).sum(-1)  # noqa: E731
    counts = torch.bincount(code(samples), minlength=len(seqs)).double()
    order = code(seqs)
    expected = p[torch.argsort(order)] * len(samples)
    keep = expected >= 5
    stat = float((((counts - expected) ** 2) / expected)[keep].sum())
    stat += float(((counts[~keep].sum() - expected[~keep].sum()) ** 2) / max(expected[~keep].sum(), 1e-9))
    return chi2_pvalue(stat, int(keep.sum()))


@pytest.fixture(scope="session")
def toy():
    seqs, p = toy_distribution()
    return seqs, p, ExactDenoiser(seqs, p)


# one small process config per family, for tests that run every family's samplers on untrained networks
TINY_PROCESSES = {
    "masked": {"type": "masked"}, "uniform": {"type": "uniform"}, "sedd": {"type": "sedd"},
    "d3pm": {"type": "d3pm", "steps": 40}, "gaussian": {"type": "gaussian", "embed_dim": 8},
    "autoregressive": {"type": "autoregressive"}, "block": {"type": "block", "block_size": 4},
}


# ---- Markov source and tiny trained models -------------------------------------------------------------
MARKOV_L = 16


@pytest.fixture(scope="session")
def markov_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("markov")
    P = markov.transition_matrix(0)
    markov.write_corpus(d / "train.txt", P, 20000, MARKOV_L, 1)
    markov.write_corpus(d / "valid.txt", P, 2000, MARKOV_L, 2)
    return d, P


def markov_run(d: Path, process: dict, **train) -> RunConfig:
    t = {"batch_size": 64, "max_steps": 800, "lr": 3e-3, "warmup_steps": 50, "ema": 0.99, "eval_every": 10**6,
         "save_every": 10**6, "tensorboard": False, "bf16": False, "log_every": 50}
    t.update(train)
    return RunConfig.from_dict({
        "name": process["type"],
        "data": {"corpus": "text", "path": str(d / "train.txt"), "valid_path": str(d / "valid.txt"),
                 "mode": "lines", "seq_len": MARKOV_L + 1, "cache_dir": str(d / "cache")},
        "tokenizer": {"type": "char"}, "model": {"n_layer": 2, "n_head": 2, "d_model": 64},
        "process": process, "train": t, "sample": {"steps": 64},
    })


@pytest.fixture(scope="session")
def markov_models(markov_corpus):
    d, P = markov_corpus
    out = {}
    for name, proc in (("masked", {"type": "masked"}), ("ar", {"type": "autoregressive"})):
        # batch 128: at 64 the bound after 800 steps varied by ±0.05 nats from seed to seed
        Trainer(markov_run(d, proc, batch_size=128, lr=2e-3), d / name, progress=False).fit()
        out[name] = DiffusionLM.from_pretrained(d / name)
    return out, P, markov.per_token_entropy(P, MARKOV_L), d


@pytest.fixture(scope="session")
def markov_family_runs(markov_corpus, tmp_path_factory):
    """Run folders of families trained on the Markov source (batch 128, lr 2e-3, 600 steps), each trained once per
    session on first use and shared by the tests that need that family: ``markov_family_runs(process) -> Path``.
    Treat a folder as read-only (copy it to write into it)."""
    import json

    d, _ = markov_corpus
    runs: dict[str, Path] = {}

    def get(process: dict) -> Path:
        key = json.dumps(process, sort_keys=True)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp(process["type"])
            Trainer(markov_run(d, process, batch_size=128, lr=2e-3, max_steps=600), run_dir, progress=False).fit()
            runs[key] = run_dir
        return runs[key]

    return get


class OnFirstUse(dict):
    """A dict that builds a missing entry with ``make(key)`` on first use (a trained model, say), so that a test
    that is not run (``-k``, ``-m 'not slow'``) builds nothing."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = self.make(key)
        return self[key]


__all__ = ["ExactDenoiser", "OnFirstUse", "TINY_PROCESSES", "chi2_gof", "chi2_pvalue", "np"]
