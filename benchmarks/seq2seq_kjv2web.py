"""Style transfer King James -> World English Bible (../shared/data/kjv2web): BLEU, ROUGE-L, self-BLEU and
dist for masked, Gaussian (with/without self-conditioning, with/without MBR) and AR seq2seq models at equal
size and training tokens, plus the copy-the-source baseline, with wall time per sentence and steps used.

    python benchmarks/seq2seq_kjv2web.py --steps 3000 --limit 200
    python benchmarks/seq2seq_kjv2web.py --steps 20 --limit 4 --out /tmp/s2s-smoke   # a smoke run

Writes <out>/seq2seq-kjv2web.json and prints a Markdown table.
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
from likelihood import finished  # benchmarks/likelihood.py: a finished run's step, tokens and seconds

from difflm.config import load_config
from difflm.data.corpora import load_pairs
from difflm.evaluation.seq2seq import score_outputs, text_scores
from difflm.pipeline import DiffusionLM
from difflm.training.trainer import Trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kjv2web"
MODELS = {  # name: (preset, extra overrides)
    "mdlm": ("kjv2web-mdlm", []),
    "gaussian": ("kjv2web-gaussian", ["process.self_conditioning=false"]),
    "gaussian-sc": ("kjv2web-gaussian", ["process.self_conditioning=true"]),
    "ar": ("kjv2web-ar", []),
}
METRICS = ["bleu", "rouge", "dist", "self-bleu"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=3000, help="training steps per model")
    ap.add_argument("--limit", type=int, default=200, help="test pairs generated for")
    ap.add_argument("--candidates", type=int, default=4, help="samples per source (MBR, self-BLEU)")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every model")
    ap.add_argument("--reuse", action="store_true",
                    help="generate with runs already trained to --steps in OUT/runs instead of training them again "
                         "(train s then comes from each run's own log)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    pairs = None
    for name in a.models.split(","):
        preset, extra = MODELS[name]
        run = load_config(preset, [f"data.path={DATA}", f"train.max_steps={a.steps}", f"train.eval_every={a.steps}",
                                   f"name=kjv2web-{name}", *extra, *a.set])
        run_dir = out / "runs" / f"kjv2web-{name}"
        done = finished(run_dir, a.steps) if a.reuse else None
        if done is not None:
            train_s = done[2]
        else:
            t0 = time.time()
            Trainer(run, run_dir, overwrite=True, progress=sys.stderr.isatty()).fit()
            train_s = time.time() - t0
        lm = DiffusionLM.from_pretrained(run_dir)
        pairs = pairs or load_pairs(lm.run.data, "test")[: a.limit]
        t0 = time.time()  # one generation; the first candidate and the MBR choice are both scored from it
        outs = lm.generate_targets([p for p, _ in pairs], candidates=max(a.candidates, 2), mbr=True, seed=0)
        seconds = time.time() - t0
        for mbr in ([False, True] if a.candidates > 1 else [False]):
            r = score_outputs(outs, [t for _, t in pairs], METRICS, mbr=mbr, seconds=seconds)
            steps = None if lm.process.family == "autoregressive" else lm.run.sample.steps  # AR: one call/token
            rows.append({"model": name, "mbr": mbr, "steps": steps, "sampler": lm.run.sample.sampler,
                         "train_seconds": round(train_s, 1), **{k: v for k, v in r.items() if k != "examples"}})
            print(json.dumps(rows[-1]), flush=True)
    copy = text_scores([s for s, _ in pairs], [t for _, t in pairs], [[s, s] for s, _ in pairs], ["bleu", "rouge"])
    rows.append({"model": "copy the source", "mbr": False, **copy})
    meta = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    (out / "seq2seq-kjv2web.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| model | MBR | sampler, steps | BLEU | ROUGE-L | self-BLEU | dist-2 | NFE / candidate | s / source |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [fmt(r, "bleu"), fmt(r, "rouge_l"), fmt(r, "self_bleu"), fmt(r, "dist_2", 3),
                 fmt(r, "nfe_per_candidate", 0), fmt(r, "seconds_per_source", 3)]
        print(f"| {r['model']} | {'yes' if r['mbr'] else 'no'} | {r.get('sampler', '-')}, {r.get('steps') or '-'} | "
              + " | ".join(cells) + " |")


def fmt(row: dict, key: str, digits: int = 1) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "-"


if __name__ == "__main__":
    main()
