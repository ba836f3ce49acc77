"""Metrics on generated text: BLEU, ROUGE-L, dist-n, self-BLEU, and MBR selection (DiffuSeq §4.3).

BLEU is sacrebleu's (13a tokenization). Self-BLEU of a set of candidates is one corpus BLEU over every
*ordered* pair (i, j), i ≠ j, hypothesis c_i against reference c_j: BLEU is not symmetric, so the
unordered i < j version several reference implementations compute measures only half of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        from ..errors import DiffLMError

        raise DiffLMError("BLEU needs the package sacrebleu: pip install sacrebleu") from None
    return sacrebleu


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0–100) of hypotheses against one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return float(_sacrebleu().corpus_bleu(list(hypotheses), [list(references)]).score)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Smoothed sentence BLEU (0–100; exponential smoothing, effective order)."""
    return float(_sacrebleu().sentence_bleu(hypothesis, [reference]).score)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(|a|·|b|) time, O(|b|) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence ROUGE-L F1 (0–100) over whitespace tokens (Lin 2004, F with β = 1)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scores = []
    for h, r in zip(hypotheses, references):
        hw, rw = h.split(), r.split()
        lcs = _lcs(hw, rw)
        if lcs == 0:
            scores.append(0.0)
            continue
        p, q = lcs / len(hw), lcs / len(rw)
        scores.append(2 * p * q / (p + q))
    return 100.0 * sum(scores) / max(len(scores), 1)


def dist_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: distinct n-grams / all n-grams over the whole set (whitespace tokens; Li et al. 2016)."""
    grams: Counter = Counter()
    for t in texts:
        w = t.split()
        grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def self_bleu(candidates: Sequence[str]) -> float:
    """Corpus BLEU over all ordered pairs (c_i hypothesis, c_j reference), i ≠ j; needs ≥ 2 candidates.
    100 = every candidate the same; lower = more diverse."""
    k = len(candidates)
    if k < 2:
        raise ValueError("self-BLEU needs at least two candidates")
    hyps = [candidates[i] for i in range(k) for j in range(k) if i != j]
    refs = [candidates[j] for i in range(k) for j in range(k) if i != j]
    return bleu(hyps, refs)


def mbr_select(candidates: Sequence[str]) -> int:
    """Minimum-Bayes-risk choice: the index of the candidate with the highest total sentence BLEU against
    the others (the candidates as samples of the model's distribution, BLEU as the utility)."""
    if not candidates:
        raise ValueError("no candidates")
    k = len(candidates)
    if k == 1:
        return 0
    gain = [sum(sentence_bleu(candidates[i], candidates[j]) for j in range(k) if j != i) for i in range(k)]
    return max(range(k), key=lambda i: (gain[i], -i))
