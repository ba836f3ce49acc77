"""A first-order Markov source with an exactly computable entropy, written as a text corpus."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

ALPHABET = "abcdef"


def transition_matrix(seed: int = 0) -> np.ndarray:
    """A peaked random transition matrix over the alphabet (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    V = len(ALPHABET)
    P = rng.dirichlet(np.full(V, 0.3), size=V)
    return P


def stationary(P: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    return pi / pi.sum()


def sequence_entropy(P: np.ndarray, L: int) -> float:
    """H(x_1..x_L) in nats for a chain started from its stationary distribution."""
    pi = stationary(P)
    h0 = -float(np.sum(pi * np.log(pi)))
    rate = -float(np.sum(pi[:, None] * P * np.log(np.where(P > 0, P, 1))))
    return h0 + (L - 1) * rate


def sample(P: np.ndarray, n: int, L: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pi = stationary(P)
    cdf = np.cumsum(P, 1)
    x = np.empty((n, L), dtype=np.int64)
    x[:, 0] = rng.choice(len(pi), size=n, p=pi)
    for i in range(1, L):
        u = rng.random(n)
        x[:, i] = np.minimum((u[:, None] > cdf[x[:, i - 1]]).sum(1), len(pi) - 1)
    return x


def write_corpus(path: Path, P: np.ndarray, n: int, L: int, seed: int) -> None:
    x = sample(P, n, L, seed)
    path.write_text("\n".join("".join(ALPHABET[i] for i in row) for row in x) + "\n")


def bigram_freqs(texts: list[str]) -> np.ndarray:
    """(V, V) relative frequencies of the bigrams of alphabet symbols in the texts."""
    V = len(ALPHABET)
    idx = {c: i for i, c in enumerate(ALPHABET)}
    counts = np.zeros((V, V))
    for t in texts:
        for a, b in zip(t, t[1:]):
            if a in idx and b in idx:
                counts[idx[a], idx[b]] += 1
    return counts / max(counts.sum(), 1)


def bigram_tv(texts: list[str], P: np.ndarray) -> float:
    """Total-variation distance between the samples' bigram frequencies and the source's."""
    true = stationary(P)[:, None] * P
    return 0.5 * float(np.abs(bigram_freqs(texts) - true).sum())


def per_token_entropy(P: np.ndarray, L: int) -> float:
    """Entropy per token of a line of L symbols followed by [EOS] (which costs nothing)."""
    return sequence_entropy(P, L) / (L + 1)


__all__ = ["ALPHABET", "bigram_tv", "math", "per_token_entropy", "sample", "sequence_entropy",
           "stationary", "transition_matrix", "write_corpus"]
