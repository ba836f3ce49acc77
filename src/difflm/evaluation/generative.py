"""Sample quality against speed: generative perplexity under an AR evaluator, unigram entropy of the
samples, network calls and tokens per second, for each sampler of a model at several step counts.

NELBO does not rank samplers: a sampler that emits one frequent token everywhere has a low generative
perplexity and a low unigram entropy, so the two are read together.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import torch

from .. import registry
from ..diffusion import Batch
from ..errors import DiffLMError
from ..precision import autocast


def bench_samplers(family: str, process=None) -> list[tuple[str, dict]]:
    """The (sampler, options) settings ``bench-sampling`` runs for a family: each registered sampler that fits
    it (and, given a model's ``process``, can decode that model: ``Sampler.fits``), with every setting in its
    ``bench`` declaration, in registration order."""
    return [(c.name, dict(opts)) for c in registry.samplers(family) if process is None or c.fits(process)
            for opts in c.bench]


def step_free(name: str, family: str, options: dict | None = None) -> bool:
    """Whether a sampler's cost and output, with these options, do not depend on ``steps`` (run once, at
    steps = length)."""
    return registry.sampler_class(name, family).free_of_steps(options or {})


@torch.no_grad()
def ar_nll(ar, tokens: torch.Tensor, special: set[int], batch_size: int = 16) -> tuple[float, int]:
    """ar: a DiffusionLM of the autoregressive family. Total exact NLL (nats) of the rows of ``tokens``
    (N, L) over their non-special tokens, and the number of tokens scored."""
    require_autoregressive(ar)
    if tokens.shape[1] > ar.seq_len:
        raise DiffLMError(f"samples of {tokens.shape[1]} tokens are longer than the evaluator's {ar.seq_len}")
    loss_mask = torch.ones_like(tokens, dtype=torch.bool)
    for s in special:
        loss_mask &= tokens != s
    total = 0.0
    for i in range(0, len(tokens), batch_size):
        x, m = tokens[i : i + batch_size].to(ar.device), loss_mask[i : i + batch_size].to(ar.device)
        with autocast(ar.device, True):
            total += float(ar.process.nelbo(ar.model, Batch(x, m, torch.zeros_like(m))).sum())
    return total, int(loss_mask.sum())


def unigram_entropy(tokens: torch.Tensor, special: set[int]) -> float:
    """Entropy (nats) of the empirical distribution of the non-special tokens in ``tokens``."""
    c = Counter(t for t in tokens.flatten().tolist() if t not in special)
    n = sum(c.values())
    return -sum(v / n * math.log(v / n) for v in c.values()) if n else 0.0


def special_ids(tokenizer) -> set[int]:
    return {tokenizer.pad_id, tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id}


def require_autoregressive(ar) -> None:
    """The judge of generative perplexity must give exact likelihoods (an autoregressive model)."""
    if not ar.process.exact_likelihood:
        raise DiffLMError("the evaluator for generative perplexity must be an autoregressive model")


def check_evaluator(lm, ar) -> None:
    """The AR evaluator must be autoregressive and share the model's tokenizer (scores are on token ids)."""
    require_autoregressive(ar)
    if lm.tokenizer.hf.to_str() != ar.tokenizer.hf.to_str():
        raise DiffLMError("the AR evaluator uses a different tokenizer than the model; give one trained on the "
                          "same data (e.g. the matching *-ar run)")


def bench_sampling(lm, ar=None, *, samplers: list[tuple[str, dict]] | None = None,
                   steps_list: tuple[int, ...] = (16, 64, 256, 1024), num: int = 16, seed: int = 0,
                   length: int | None = None, on_row=None, scorer=None) -> list[dict]:
    """For each (sampler, options) and step count: generative perplexity under ``ar`` (when given) and under
    ``scorer`` (a pretrained LM, ``evaluation.external``; key ``scorer_ppl``), unigram entropy, network calls
    per sequence, tokens/s and seconds per sample; one row each."""
    if ar is not None:
        check_evaluator(lm, ar)
    special = special_ids(lm.tokenizer)
    family = lm.process.family
    samplers = samplers or bench_samplers(family, lm.process)
    length = length or lm.seq_len
    rows = []
    for name, opts in samplers:
        free = step_free(name, family, opts)
        for steps in ([length] if free else steps_list):
            t0 = time.perf_counter()
            try:
                g = lm.generate(num, length, steps=steps, sampler=name, seed=seed, batch_size=num,
                                sampler_options=opts)
            except DiffLMError as e:  # e.g. more steps than a D3PM model has
                rows.append({"sampler": name, "options": opts, "steps": steps, "error": str(e)})
                continue
            sec = time.perf_counter() - t0
            row = {"sampler": name, "options": opts, "steps": None if free else steps,
                   "nfe": float(g.nfe.double().mean()), "tokens_per_s": num * length / sec,
                   "seconds_per_sample": sec / num, "unigram_entropy": unigram_entropy(g.tokens, special)}
            if ar is not None:
                nll, n = ar_nll(ar, g.tokens, special)
                row["gen_ppl"] = math.exp(nll / max(n, 1))
            if scorer is not None:
                row["scorer_ppl"] = scorer.perplexity(g.texts)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def markdown(rows: list[dict], scorer_name: str = "pretrained LM") -> str:
    """The rows as a Markdown table (a column for the pretrained scorer when the rows have one, and a first
    column for the model when they name one)."""
    scored = any("scorer_ppl" in r for r in rows)
    named = any("model" in r for r in rows)
    extra = f" gen. perplexity ({scorer_name}) |" if scored else ""
    out = [("| model " if named else "") + f"| sampler | options | steps | gen. perplexity (AR) |{extra} "
           "unigram entropy (nats) | NFE / sequence | tokens/s | s / sample |",
           "|---|---|---|---|" + "---|" * (5 if scored else 4) + ("---|" if named else "")]
    for r in rows:
        lead = f"| {r.get('model', '-')} " if named else ""
        opts = ", ".join(f"{k}={v}" for k, v in r.get("options", {}).items()) or "-"
        if "error" in r:
            out.append(f"{lead}| {r['sampler']} | {opts} | {r['steps']} | {r['error']} |" + " |" * (5 if scored else 4))
            continue
        ppl = f"{r['gen_ppl']:.1f}" if "gen_ppl" in r else "-"
        if scored:
            ppl += f" | {r['scorer_ppl']:.1f}" if "scorer_ppl" in r else " | -"
        steps = "-" if r["steps"] is None else r["steps"]
        out.append(f"{lead}| {r['sampler']} | {opts} | {steps} | {ppl} | {r['unigram_entropy']:.3f} | "
                   f"{r['nfe']:.1f} | {r['tokens_per_s']:.1f} | {r['seconds_per_sample']:.3f} |")
    return "\n".join(out)
