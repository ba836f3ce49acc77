"""Seq2seq evaluation: generate targets for a split's sources and score them against the references."""

from __future__ import annotations

import time

from ..errors import DiffLMError
from .text_metrics import bleu, dist_n, rouge_l, self_bleu

METRICS = ("bleu", "rouge", "dist", "self-bleu")


def parse_metrics(spec: str) -> list[str]:
    """'bleu,rouge' -> ['bleu', 'rouge'], with a clear error for an unknown name."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise DiffLMError(f"unknown --metrics {', '.join(bad) or spec!r}; choose from {', '.join(METRICS)}")
    return names


def text_scores(predictions: list[str], references: list[str], candidates: list[list[str]],
                metrics: list[str]) -> dict:
    """The chosen metrics: BLEU / ROUGE-L of predictions vs references; dist-1/2 over the predictions;
    self-BLEU over each source's candidates (all ordered pairs), averaged over sources."""
    out: dict = {}
    if "bleu" in metrics:
        out["bleu"] = bleu(predictions, references)
    if "rouge" in metrics:
        out["rouge_l"] = rouge_l(predictions, references)
    if "dist" in metrics:
        out["dist_1"], out["dist_2"] = dist_n(predictions, 1), dist_n(predictions, 2)
    if "self-bleu" in metrics:
        if min(len(c) for c in candidates) < 2:
            raise DiffLMError("self-BLEU compares a source's candidates with each other: use --candidates 2 or more")
        out["self_bleu"] = sum(self_bleu(c) for c in candidates) / len(candidates)
    return out


def score_outputs(outs: list, references: list[str], metrics: list[str], *, mbr: bool, seconds: float) -> dict:
    """outs: generate_targets' Transductions for the sources in order. Scores the MBR choice (``mbr``) or
    each source's first candidate; self-BLEU is over all candidates either way."""
    picks = [o.prediction if mbr else o.candidates[0] for o in outs]
    scores = text_scores(picks, references, [o.candidates for o in outs], metrics)
    k = len(outs[0].candidates)
    return {**scores, "n": len(outs), "candidates": k, "mbr": bool(mbr and k > 1),
            "nfe_per_candidate": sum(o.nfe for o in outs) / len(outs), "seconds_per_source": seconds / len(outs),
            "examples": [{"source": o.source, "prediction": p} for o, p in zip(outs[:3], picks)]}


def evaluate_seq2seq(lm, pairs: list[tuple[str, str]], metrics: list[str], *, candidates: int = 1,
                     mbr: bool = True, **generate_kw) -> dict:
    """lm: a DiffusionLM trained on pairs. Generates for every source and scores against its target."""
    t0 = time.time()
    outs = lm.generate_targets([s for s, _ in pairs], candidates=candidates, mbr=mbr, **generate_kw)
    return score_outputs(outs, [t for _, t in pairs], metrics, mbr=mbr, seconds=time.time() - t0)
