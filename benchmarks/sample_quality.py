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
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch

from difflm.data import build_dataset
from difflm.diffusion import Batch
from difflm.errors import DiffLMError
from difflm.pipeline import DiffusionLM
from difflm.sampling import DEFAULT_SAMPLER, SAMPLER_NAMES, get_sampler

SAMPLERS = {"masked": ["ancestral", "cached"], "sedd": ["analytic", "euler"], "uniform": ["ancestral"],
            "d3pm": ["ancestral"]}


@torch.no_grad()
def ar_nll(ar: DiffusionLM, tokens: torch.Tensor, special: set[int]) -> tuple[float, int]:
    """Total exact NLL (nats) of the sequences under the AR model and the number of tokens scored."""
    loss_mask = torch.ones_like(tokens, dtype=torch.bool)
    for s in special:
        loss_mask &= tokens != s
    total = 0.0
    for i in range(0, len(tokens), 16):
        b = Batch(tokens[i:i + 16], loss_mask[i:i + 16], torch.zeros_like(tokens[i:i + 16], dtype=torch.bool))
        with ar._autocast(True):
            total += float(ar.process.nelbo(ar.model, b).sum())
    return total, int(loss_mask.sum())


def unigram_entropy(tokens: torch.Tensor, special: set[int]) -> float:
    """Entropy (nats) of the empirical token distribution of the samples."""
    c = Counter(t for t in tokens.flatten().tolist() if t not in special)
    n = sum(c.values())
    return -sum(v / n * math.log(v / n) for v in c.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", choices=["ptb", "shakespeare"], required=True)
    ap.add_argument("--families", default="mdlm,sedd-absorb,sedd-uniform,uniform,d3pm-absorb,d3pm-uniform")
    ap.add_argument("--steps", default="16,64,256,1024")
    ap.add_argument("--num", type=int, default=16, help="samples per (sampler, steps)")
    ap.add_argument("--out", default="benchmarks/out")
    a = ap.parse_args()
    runs = Path(a.out) / "runs"
    ar_dir = runs / f"{a.corpus}-ar"
    if not ar_dir.exists():
        sys.exit(f"no AR baseline at {ar_dir}: run benchmarks/likelihood.py --corpus {a.corpus} first")
    ar = DiffusionLM.from_pretrained(ar_dir)
    tok = ar.tokenizer
    special = {tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id}
    # reference: held-out text of the same length
    valid = build_dataset(ar.run.data, tok, "valid")
    ref = valid.batch(list(range(min(len(valid), a.num * 4)))).tokens
    nll, n = ar_nll(ar, ref, special)
    rows = [{"family": "validation text", "sampler": "-", "steps": 0, "gen_ppl": math.exp(nll / n),
             "unigram_entropy": unigram_entropy(ref, special), "nfe": 0.0, "seconds_per_sample": 0.0}]
    steps_list = [int(s) for s in a.steps.split(",")]
    for fam in a.families.split(","):
        run_dir = runs / f"{a.corpus}-{fam}"
        if not run_dir.exists():
            print(f"skipping {fam}: no run at {run_dir}", file=sys.stderr)
            continue
        lm = DiffusionLM.from_pretrained(run_dir)
        for sampler in SAMPLERS.get(lm.process.family, [DEFAULT_SAMPLER[lm.process.family]]):
            get_sampler(sampler, lm.process)  # fails loudly if the table above went stale
            for steps in steps_list:
                t0 = time.perf_counter()
                try:
                    g = lm.generate(a.num, steps=steps, sampler=sampler, seed=0, batch_size=a.num)
                except DiffLMError as e:  # e.g. more steps than a D3PM model has
                    print(f"{fam}/{sampler}/{steps}: {e}", file=sys.stderr)
                    continue
                sec = (time.perf_counter() - t0) / a.num
                nll, n = ar_nll(ar, g.tokens, special)
                rows.append({"family": fam, "sampler": sampler, "steps": steps, "gen_ppl": math.exp(nll / n),
                             "unigram_entropy": unigram_entropy(g.tokens, special),
                             "nfe": float(g.nfe.double().mean()), "seconds_per_sample": sec})
                print(json.dumps(rows[-1]), flush=True)
    meta = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "samplers": SAMPLER_NAMES}
    (Path(a.out) / f"sample-quality-{a.corpus}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| family | sampler | steps | gen. perplexity (AR) | unigram entropy (nats) | NFE | s / sample |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['sampler']} | {r['steps']} | {r['gen_ppl']:.1f} | {r['unigram_entropy']:.3f} | "
              f"{r['nfe']:.0f} | {r['seconds_per_sample']:.3f} |")


if __name__ == "__main__":
    main()
