"""Style transfer King James → World English Bible with the edit family, decoding from the KJV source, next to
copying the source (40.6 BLEU on test) and the masked and AR seq2seq models trained for the same wall time; the
edit model also from the AR model's output (DiffusER's AR bootstrap).

    python benchmarks/edit_kjv2web.py --minutes 60 [--test 1141] [--threads N] [--models ar,masked,edit]
        [--train-only | --skip-train]

Metrics on the first --test test verses: BLEU (sacrebleu), ROUGE-L, self-BLEU over the model's first 200 outputs
(all ordered pairs; over all 1,141 it is 1.3 million pairs and 15 GB), the
average number of word edits per verse between source and output, NFE and seconds per verse. Goal (issue 22):
BLEU above copying the source. Models share benchmarks/edit_typos.py's shape (4 layers, 256 wide, byte-level
BPE 2,048, rows of 128 tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from edit_typos import train_model  # noqa: E402 (benchmarks/ is the script's folder)

from difflm.diffusion.edits import levenshtein
from difflm.evaluation.text_metrics import bleu, rouge_l, self_bleu
from difflm.pipeline import DiffusionLM

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kjv2web"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--test", type=int, default=1141)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/edit-kjv2web"))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--models", default="ar,masked,edit", help="the models to train (all three are scored)")
    ap.add_argument("--train-only", action="store_true", help="train the named models and score nothing (two "
                    "processes with --threads 1 train two models at once; one --skip-train run scores them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training and scoring "
                    "(default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    rows = [json.loads(x) for x in (a.data / "test.jsonl").read_text().splitlines()][: a.test]
    src, ref = [r["source"] for r in rows], [r["target"] for r in rows]
    out = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads", "minutes": a.minutes, "rows": []}

    def score(name: str, hyp: list[str], seconds: float, nfe: float) -> dict:
        edits = sum(levenshtein(s.split(), h.split()) for s, h in zip(src, hyp)) / len(hyp)
        return {"model": name, "bleu": bleu(hyp, ref), "rouge_l": rouge_l(hyp, ref), "self_bleu": self_bleu(hyp[:200]),
                "edits_per_verse": edits, "nfe": nfe, "seconds_per_verse": seconds / len(hyp)}

    out["rows"].append(score("copy the source", src, 0.0, 0.0))
    lms = {}
    for name in ("ar", "masked", "edit"):
        run = a.out / name
        if not a.skip_train and name in a.models.split(","):
            train_model(name, a.data, a.out, a.minutes, a.threads, "kjv2web")
        if not a.train_only:
            lms[name] = DiffusionLM.from_pretrained(run)
    if a.train_only:
        return
    valid = [json.loads(x) for x in (a.data / "valid.jsonl").read_text().splitlines()][:200]

    def keep_bias(opts: dict) -> float:
        """GECToR's confidence bias on KEEP for these sampler options, chosen on 200 valid verses by BLEU."""
        return max((bleu([o.prediction.strip() for o in lms["edit"].generate_targets(
            [r["source"] for r in valid], batch_size=32, sampler_options=opts | {"keep_bias": b})],
            [r["target"] for r in valid]), b) for b in (0.0, 1.0, 2.0, 3.0, 5.0))[1]

    # the edit and masked models drawn (their samplers' default, the only rows until 2026-12-05) and by argmax; AR
    # greedy (rows before 2026-12-05 drew each token)
    drawn, greedy = {}, {"greedy": True}
    bias, bias_g = keep_bias(drawn), keep_bias(greedy)
    decoders = [("ar (greedy)", {"sampler_options": greedy}), ("masked", {}),
                ("masked (greedy)", {"sampler_options": greedy}), ("edit", {}),
                (f"edit, keep bias {bias:g} (chosen on valid)", {"sampler_options": {"keep_bias": bias}}),
                ("edit (greedy)", {"sampler_options": greedy}),
                (f"edit (greedy), keep bias {bias_g:g} (chosen on valid)",
                 {"sampler_options": greedy | {"keep_bias": bias_g}}),
                ("edit from AR drafts", {"draft_from": lms["ar"]}),
                (f"edit from AR drafts, keep bias {bias:g}", {"draft_from": lms["ar"],
                                                              "sampler_options": {"keep_bias": bias}}),
                (f"edit (greedy) from AR drafts, keep bias {bias_g:g}",
                 {"draft_from": lms["ar"], "sampler_options": greedy | {"keep_bias": bias_g}})]
    for name, kw in decoders:
        t0 = time.perf_counter()
        res = lms[name.split(" ")[0].rstrip(",")].generate_targets(src, batch_size=32, **kw)
        row = score(name, [o.prediction.strip() for o in res], time.perf_counter() - t0,
                    sum(o.nfe for o in res) / len(res))
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    (a.out / "results.json").write_text(json.dumps(out, indent=2))
    print(f"\n{out['date']}, {out['machine']}, {a.minutes} min of training each, {len(rows)} test verses\n")
    print("| model | BLEU | ROUGE-L | self-BLEU | word edits / verse | NFE | s / verse |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['model']} | {r['bleu']:.1f} | {r['rouge_l']:.3f} | {r['self_bleu']:.1f} | "
              f"{r['edits_per_verse']:.1f} | {r['nfe']:.0f} | {r['seconds_per_verse']:.3f} |")


if __name__ == "__main__":
    main()
