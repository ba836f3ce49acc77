"""Masked diffusion vs autoregressive at the same model size and training tokens: validation bound.

    python benchmarks/likelihood.py --corpus ptb --steps 500
    python benchmarks/likelihood.py --corpus shakespeare --steps 500

Trains ``<corpus>-mdlm`` and ``<corpus>-ar`` presets with identical data, model and schedule, evaluates
both on the validation split with K time samples, and writes benchmarks/out/likelihood-<corpus>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from difflm.config import load_config
from difflm.data import build_dataset
from difflm.evaluation import evaluate
from difflm.pipeline import DiffusionLM
from difflm.training.trainer import Trainer

PRESETS = {
    "ptb": ("ptb-mdlm-small", "ptb-ar-small"),
    "shakespeare": ("shakespeare-char-mdlm", "shakespeare-char-ar"),
}
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", choices=sorted(PRESETS), required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--samples", type=int, default=8, help="K time samples for the CI")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in PRESETS[a.corpus]:
        overrides = [f"train.max_steps={a.steps}", f"train.eval_every={a.steps}", *a.set]
        if a.corpus == "shakespeare":
            overrides.append(f"data.path={SHAKESPEARE}")
        run = load_config(preset, overrides)
        run_dir = out / "runs" / preset
        t0 = time.time()
        res = Trainer(run, run_dir, overwrite=True, progress=sys.stderr.isatty()).fit()
        train_s = time.time() - t0
        lm = DiffusionLM.from_pretrained(run_dir)
        data = build_dataset(run.data, lm.tokenizer, "valid")
        r = evaluate(lm.model, lm.process, data, n_samples=a.samples, char_level=lm.tokenizer.kind == "char")
        rows.append({"preset": preset, "family": lm.process.family, "tokens": res.tokens, "steps": res.step,
                     "train_seconds": round(train_s, 1), "params_non_embedding": lm.model.num_params(),
                     **r.to_dict()})
        print(preset, r.summary(), flush=True)
    ar = next(r for r in rows if r["family"] == "autoregressive")
    for r in rows:
        r["ratio_to_ar"] = r["nelbo"] / ar["nelbo"]
    meta = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"torch {torch.__version__}"}
    (out / f"likelihood-{a.corpus}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
