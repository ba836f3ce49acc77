"""Families at the same model size and training tokens: validation bound with a 95% CI.

    python benchmarks/likelihood.py --corpus ptb --steps 600
    python benchmarks/likelihood.py --corpus shakespeare --steps 400 --families mdlm,ar

Each family is the corpus's masked preset with the process swapped (so data, tokenizer, model size,
optimizer, schedule and token budget are identical), trained, then evaluated on the validation split
with K time samples by the one evaluator. Writes benchmarks/out/likelihood-<corpus>.json and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from difflm.config import load_config, process_options
from difflm.pipeline import DiffusionLM
from difflm.training.trainer import Trainer

BASE = {"ptb": "ptb-mdlm-small", "shakespeare": "shakespeare-char-mdlm"}
# family name -> the process section that replaces the preset's (model size and training are unchanged)
FAMILIES: dict[str, dict] = {
    "ar": {"type": "autoregressive"},
    "mdlm": {"type": "masked", "schedule": "loglinear", "time_conditioning": False},
    "mdlm-time": {"type": "masked", "schedule": "loglinear", "time_conditioning": True},  # adaLN on t
    "sedd-absorb": {"type": "sedd", "graph": "absorb", "schedule": "loglinear"},
    "sedd-uniform": {"type": "sedd", "graph": "uniform", "schedule": "geometric"},
    "uniform": {"type": "uniform", "schedule": "loglinear"},
    "bd3lm-4": {"type": "block", "block_size": 4},  # BD3-LM, blocks of 4 tokens
    "bd3lm-16": {"type": "block", "block_size": 16},
    "d3pm-absorb": {"type": "d3pm", "transition": "absorb", "steps": 1000},  # β = 1/(T−t+1)
    "d3pm-uniform": {"type": "d3pm", "transition": "uniform", "steps": 1000},  # cosine
    # the auxiliary CE's optimum is not eq. 4's for non-absorbing matrices (d3pm.py): a smaller λ
    "d3pm-uniform-l1e-3": {"type": "d3pm", "transition": "uniform", "steps": 1000, "hybrid_lambda": 0.001},
}
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def markdown(rows: list[dict], unit: str) -> str:
    lines = [f"| family | valid {unit} | 95% CI | perplexity bound | ratio to AR (nats) | tokens | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        value, ci = (r["bpc"], r["bpc_ci95"]) if unit == "bits/char" else (r["nelbo"], r["ci95"])
        lines.append(f"| {r['family_name']} | {value:.4f} | ± {ci:.4f} | {r['ppl']:.2f} | "
                     f"{r['ratio_to_ar']:.3f} | {r['tokens']:,} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", choices=sorted(BASE), required=True)
    ap.add_argument("--families", default="mdlm,ar", help=f"comma-separated, from {sorted(FAMILIES)}")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--samples", type=int, default=8, help="K time samples for the CI")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for every family")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate a run already trained to --steps in OUT/runs instead of training it again")
    a = ap.parse_args()
    names = a.families.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        sys.exit(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"likelihood-{a.corpus}.json"
    rows = []
    for name in names:
        overrides = [f"train.max_steps={a.steps}", f"train.eval_every={a.steps}", f"name={a.corpus}-{name}",
                     *a.set]
        if a.corpus == "shakespeare":
            overrides.append(f"data.path={SHAKESPEARE}")
        run = load_config(BASE[a.corpus], overrides)
        run.process = process_options(FAMILIES[name])
        run_dir = out / "runs" / f"{a.corpus}-{name}"
        done = finished(run_dir, a.steps) if a.reuse else None
        if done is not None:
            step, tokens, train_s = done
        else:
            t0 = time.time()
            res = Trainer(run, run_dir, overwrite=True, progress=sys.stderr.isatty()).fit()
            step, tokens, train_s = res.step, res.tokens, time.time() - t0
        lm = DiffusionLM.from_pretrained(run_dir)
        r = lm.evaluate("valid", samples=a.samples)
        rows.append({"family_name": name, "family": lm.process.family, "tokens": tokens, "steps": step,
                     "train_seconds": round(train_s, 1), "params_non_embedding": lm.model.num_params(),
                     **r.to_dict()})
        print(name, r.summary(), flush=True)
        write(path, rows, names, a.steps)  # after every family, so an interrupted table keeps what finished
    print(markdown(write(path, rows, names, a.steps), "bits/char" if a.corpus == "shakespeare" else "nats/token"))


def finished(run_dir: Path, steps: int) -> tuple[int, int, float] | None:
    """(step, tokens, training seconds) of a run in ``run_dir`` whose log reached ``steps``, else None."""
    log = run_dir / "metrics.csv"
    if not (run_dir / "model.safetensors").exists() or not log.exists():
        return None
    rows = list(csv.DictReader(log.open()))
    if not rows or int(rows[-1]["step"]) != steps:
        return None
    return steps, int(rows[-1]["tokens"]), float(rows[-1]["elapsed_s"])


def write(path: Path, rows: list[dict], names: list[str], steps: int) -> list[dict]:
    """Merge ``rows`` into the JSON at ``path`` and return the merged table."""
    # keep the rows of families trained by an earlier invocation at the same budget, so a table can be
    # grown family by family (each family's training is independent and seeded identically)
    if path.exists():
        old = json.loads(path.read_text())["rows"]
        rows = [r for r in old if r["family_name"] not in names and r["steps"] == steps] + rows
        rows.sort(key=lambda r: list(FAMILIES).index(r["family_name"]) if r["family_name"] in FAMILIES else 99)
    ar = next((r for r in rows if r["family"] == "autoregressive"), None)
    for r in rows:
        r["ratio_to_ar"] = r["nelbo"] / ar["nelbo"] if ar else float("nan")
    meta = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
