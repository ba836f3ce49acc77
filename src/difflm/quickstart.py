"""``difflm quickstart``: a few minutes on a CPU from nothing to a trained masked diffusion LM.

Trains a small MDLM and an autoregressive baseline the same way (same data, model size, steps and
tokens) on Penn Treebank, reports both validation bounds, prints samples and an infilled sentence, and
leaves the model folders in OUT/mdlm and OUT/ar. Running it again resumes (or reuses) what is there.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import load_config
from .pipeline import DiffusionLM
from .training.trainer import CKPT, Trainer

# small enough for a few minutes on 2 CPU cores; the full presets are in configs/
QUICK = ["data.seq_len=64", "model.n_layer=2", "model.d_model=128", "model.n_head=4", "model.dropout=0.0",
         "train.batch_size=32", "train.warmup_steps=50", "train.eval_every=100000", "train.save_every=100",
         "train.lr=2.0e-3", "train.log_every=10", "sample.steps=64"]
INFILL = "the company said ___ in the third quarter [MASK] to $ N million"


def quickstart(out: Path, steps: int | None = None, as_json: bool = False) -> dict:
    steps = steps or 400
    report: dict = {"out": str(out), "models": {}}
    lms = {}
    for key, preset in (("mdlm", "ptb-mdlm-small"), ("ar", "ptb-ar-small")):
        run = load_config(preset, [*QUICK, f"train.max_steps={steps}", f"name=quickstart-{key}"])
        run_dir = out / key
        if not as_json:
            print(f"== training {'masked diffusion (MDLM)' if key == 'mdlm' else 'autoregressive baseline'} "
                  f"on PTB: {steps} steps of {run.train.batch_size}×{run.data.seq_len} tokens -> {run_dir}")
        Trainer(run, run_dir, resume=(run_dir / CKPT).is_file(), progress=not as_json).fit()
        lms[key] = lm = DiffusionLM.from_pretrained(run_dir)
        r = lm.evaluate("valid", samples=4, batch_size=64)
        report["models"][key] = {"dir": str(run_dir), **r.to_dict()}
    mdlm = lms["mdlm"]
    gen = mdlm.generate(3, 40, sampler="cached", steps=64, seed=0)
    filled = mdlm.infill(INFILL, span_tokens=3, steps=64, seed=0)[0]
    report["samples"] = gen.texts
    report["samples_nfe"] = gen.nfe.tolist()
    report["infill"] = {"input": INFILL, "output": filled}
    if as_json:
        print(json.dumps(report))
        return report
    m, a = report["models"]["mdlm"], report["models"]["ar"]
    print("\n== validation (PTB valid, word level; lower is better)")
    print(f"{'model':<26}{'nats/token':>20}{'perplexity':>22}")
    print(f"{'masked diffusion (NELBO)':<26}{m['nelbo']:>12.3f} ± {m['ci95']:.3f}"
          f"{'≤ ' + format(m['ppl'], '.1f'):>22}")
    print(f"{'autoregressive (NLL)':<26}{a['nelbo']:>12.3f}{'':>8}{format(a['ppl'], '.1f'):>22}")
    print(f"diffusion bound / AR loss = {m['nelbo'] / a['nelbo']:.3f} "
          f"(same model size and {steps * 32 * 64:,} training tokens each)")
    print("\n== unconditional samples (masked diffusion, cached sampler, 64 steps)")
    for t, n in zip(gen.texts, gen.nfe.tolist()):
        print(f"[{n} network calls] {t.replace(chr(10), ' / ')}")
    print(f"\n== infill\n  in:  {INFILL}\n  out: {filled}")
    print(f"\nmodels saved in {out}/mdlm and {out}/ar — try:\n"
          f"  difflm sample {out}/mdlm --num 2 --length 40\n"
          f"  difflm infill {out}/mdlm \"the [MASK] of the ___ rose\"\n"
          f"  difflm eval {out}/mdlm --samples 8")
    return report
