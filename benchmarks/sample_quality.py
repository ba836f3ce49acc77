"""Sample quality against steps for every family's samplers, using the runs `likelihood.py` trained.

    python benchmarks/sample_quality.py --corpus shakespeare --families mdlm,sedd-absorb,uniform
    python benchmarks/sample_quality.py --corpus ptb --steps 16,64,256,1024 --num 16

For each family run in benchmarks/out/runs/<corpus>-<family> and each sampler that fits it, at each step
count: generative perplexity of the samples under the AR baseline trained on the same data and tokens
(<corpus>-ar, exact NLL, computed on the token ids so no re-tokenisation enters), unigram entropy of the
samples' tokens, network calls per sequence, and wall time per sample. The same two numbers for held-out
text (the validation split) give the reference row. Writes benchmarks/out/sample-quality-<corpus>.json
and prints a Markdown table. NELBO alone does not rank samplers: a sampler that emits one frequent token
everywhere has a low generative perplexity and a low unigram entropy, so read the two together.
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
from difflm.evaluation.generative import ar_nll, bench_samplers, bench_sampling, special_ids, unigram_entropy
from difflm.pipeline import DiffusionLM
from difflm.sampling import sampler_names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", choices=["ptb", "shakespeare"], required=True)
    ap.add_argument("--families", default="mdlm,sedd-absorb,sedd-uniform,uniform,d3pm-absorb,d3pm-uniform")
    ap.add_argument("--steps", default="16,64,256,1024")
    ap.add_argument("--num", type=int, default=16, help="samples per (sampler, steps)")
    ap.add_argument("--samplers", default=None,
                    help="comma-separated sampler names to run (default: each family's bench-sampling set)")
    ap.add_argument("--out", default="benchmarks/out")
    a = ap.parse_args()
    runs = Path(a.out) / "runs"
    ar_dir = runs / f"{a.corpus}-ar"
    if not ar_dir.exists():
        sys.exit(f"no AR baseline at {ar_dir}: run benchmarks/likelihood.py --corpus {a.corpus} first")
    ar = DiffusionLM.from_pretrained(ar_dir)
    special = special_ids(ar.tokenizer)
    # reference: held-out text of the same length
    valid = build_dataset(ar.run.data, ar.tokenizer, "valid")
    ref = valid.batch(list(range(min(len(valid), a.num * 4)))).tokens
    nll, n = ar_nll(ar, ref, special)
    rows = [{"family": "validation text", "sampler": "-", "steps": 0, "gen_ppl": math.exp(nll / n),
             "unigram_entropy": unigram_entropy(ref, special), "nfe": 0.0, "seconds_per_sample": 0.0}]
    steps_list = tuple(int(s) for s in a.steps.split(","))
    for fam in a.families.split(","):
        run_dir = runs / f"{a.corpus}-{fam}"
        if not run_dir.exists():
            print(f"skipping {fam}: no run at {run_dir}", file=sys.stderr)
            continue
        lm = DiffusionLM.from_pretrained(run_dir)
        samplers = [(n, o) for n, o in bench_samplers(lm.process.family, lm.process)
                    if a.samplers is None or n in a.samplers.split(",")]
        for r in bench_sampling(lm, ar, samplers=samplers, steps_list=steps_list, num=a.num, seed=0):
            if "error" in r:
                print(f"{fam}/{r['sampler']}/{r['steps']}: {r['error']}", file=sys.stderr)
                continue
            rows.append({"family": fam, **r})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "samplers": sampler_names()}
    (Path(a.out) / f"sample-quality-{a.corpus}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| family | sampler | steps | gen. perplexity (AR) | unigram entropy (nats) | NFE | s / sample |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        steps = "-" if r["steps"] is None else r["steps"]
        print(f"| {r['family']} | {r['sampler']} | {steps} | {r['gen_ppl']:.1f} | {r['unigram_entropy']:.3f} | "
              f"{r['nfe']:.0f} | {r['seconds_per_sample']:.3f} |")


if __name__ == "__main__":
    main()
