"""Unconditional generation of tiny-Shakespeare lines from the empty sequence: DiffusER and Edit Flows against the
masked and AR models trained for the same wall time on the same lines (character level, one line per row).

    python benchmarks/edit_shakespeare.py --minutes 20 [--num 64]

For each model: generative perplexity of --num samples under the AR model (per character), unigram entropy of the
samples' characters, NFE and seconds per line, and the length histogram (characters per line, in bins of 10)
against the data's validation lines. Run alone (it times things).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch
from edit_typos import merge  # noqa: E402 (benchmarks/ is the script's folder)

from difflm.evaluation.generative import ar_nll, special_ids
from difflm.pipeline import DiffusionLM

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
BASE = {"data": {"corpus": "text", "path": str(TEXT), "mode": "lines", "seq_len": 96, "valid_fraction": 0.1},
        "tokenizer": {"type": "char"}, "model": {"n_layer": 4, "n_head": 4, "d_model": 256, "dropout": 0.1},
        "train": {"batch_size": 64, "max_steps": 100000, "lr": 1e-3, "warmup_steps": 200, "ema": 0.999,
                  "eval_every": 1000, "eval_batches": 10, "save_every": 250}}
MODELS = {"ar": {"process": {"type": "autoregressive"}, "sample": {"steps": 1}},
          "masked": {"process": {"type": "masked"}, "sample": {"steps": 96}},
          "edit": {"process": {"type": "edit", "steps": 8}, "sample": {"steps": 8}},
          "editflow": {"process": {"type": "editflow"}, "sample": {"steps": 64}}}


def histogram(lengths: list[int]) -> dict[int, float]:
    c = Counter(min(n // 10, 9) * 10 for n in lengths)
    return {k: c[k] / len(lengths) for k in sorted(c)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/edit-shakespeare"))
    ap.add_argument("--skip-train", action="store_true")
    a = ap.parse_args()
    import yaml

    lms = {}
    for name, extra in MODELS.items():
        run = a.out / name
        if not a.skip_train:
            cfg = merge(merge(BASE, extra), {"name": f"shakespeare-lines-{name}", "train": {"max_minutes": a.minutes}})
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            subprocess.run([sys.executable, "-m", "difflm.cli", "train", str(a.out / f"{name}.yaml"), "--out",
                            str(run), "--overwrite", "--no-progress"], check=True)
        lms[name] = DiffusionLM.from_pretrained(run)
    ar = lms["ar"]
    lines = [x for x in TEXT.read_text().splitlines() if x.strip()]
    valid = lines[int(0.9 * len(lines)) :]
    out = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads", "minutes": a.minutes,
           "data_lengths": histogram([len(x) for x in valid]), "rows": []}
    runs = [(name, lm, None) for name, lm in lms.items()]
    if "edit" in lms:  # DiffusER from the empty sequence (never seen in training: measured to write nothing)
        runs.insert([n for n, _, _ in runs].index("edit"), ("edit from empty", lms["edit"], {"bootstrap": "empty"}))
        runs[[n for n, _, _ in runs].index("edit")] = ("edit", lms["edit"], {"bootstrap": "random"})
    for name, lm, opts in runs:
        t0 = time.perf_counter()
        if opts and opts["bootstrap"] == "empty":  # past the pipeline's refusal, on purpose: the row shows why
            from difflm.sampling import Conditioning, get_sampler

            out_ = get_sampler("diffuser", lm.process, **opts)(lm.model, lm.process, Conditioning.unconditional(
                a.num, lm.seq_len, fill=lm.tokenizer.mask_id), steps=lm.run.sample.steps, seed=0)
            g = type("G", (), {"texts": lm.decode(out_.tokens), "nfe": out_.nfe})
        else:
            g = lm.generate(a.num, seed=0, batch_size=a.num, sampler_options=opts)
        sec = time.perf_counter() - t0
        texts = [t.split("\n")[0] for t in g.texts]
        ids = [ar.encode_text(t)[: ar.seq_len - 1] + [ar.tokenizer.eos_id] for t in texts]
        x = torch.tensor([r + [ar.tokenizer.pad_id] * (ar.seq_len - len(r)) for r in ids])
        nll, n = ar_nll(ar, x, special_ids(ar.tokenizer) - {ar.tokenizer.eos_id})
        chars = Counter("".join(texts))
        total = sum(chars.values())
        row = {"model": name, "gen_ppl_char": math.exp(nll / max(n, 1)),
               "entropy": -sum(v / total * math.log(v / total) for v in chars.values()) if total else float("nan"),
               "nfe": float(g.nfe.float().mean()), "seconds_per_line": sec / a.num,
               "lengths": histogram([len(t) for t in texts]), "samples": texts[:4]}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    (a.out / "results.json").write_text(json.dumps(out, indent=2))
    print(f"\n{out['date']}, {out['machine']}, {a.minutes} min of training each\n")
    print("| model | gen ppl / char (AR judge) | char entropy | NFE | s / line |\n|---|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['model']} | {r['gen_ppl_char']:.2f} | {r['entropy']:.2f} | {r['nfe']:.0f} | "
              f"{r['seconds_per_line']:.3f} |")
    print("\nlength histogram (share of lines per 10-character bin; 90 = 90 and longer)")
    print("| bin | data | " + " | ".join(r["model"] for r in out["rows"]) + " |")
    print("|---:|---:|" + "---:|" * len(out["rows"]))
    for b in range(0, 100, 10):
        print(f"| {b} | {out['data_lengths'].get(b, 0):.2f} | "
              + " | ".join(f"{r['lengths'].get(b, 0):.2f}" for r in out["rows"]) + " |")


if __name__ == "__main__":
    main()
