"""Diffusion-LM control table: attribute success rate and fluency, guided vs unguided, on one model.

    python benchmarks/control.py --attributes endswith:c,contains:ee,startswith:e
    python benchmarks/control.py --corpus shakespeare --attributes "endswith:?,contains:thou,startswith:And"

Trains (or reuses, in --out) a Gaussian embedding diffusion model (Diffusion-LM, 16-dim embeddings, VDM
bound) and an AR baseline on the first-order Markov source of tests/markov.py (16-character lines, known
entropy) or on the lines of tiny-Shakespeare (character level, one line per sample, up to 63 characters;
natural text), an attribute classifier on noisy embeddings for each attribute (`difflm train-classifier`), then
samples --num lines unguided and guided (`difflm control`): success = share of lines with the attribute,
fluency = generative perplexity under the AR baseline (the source's own perplexity is printed for reference).
--scale and --lr take comma-separated lists: one guided row per attribute and setting, against the same
unguided samples. Writes <out>/control.json and prints a Markdown table.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import markov  # noqa: E402

from difflm.config import RunConfig  # noqa: E402
from difflm.control import NoisyClassifier, attribute_labels, control_table, train_classifier  # noqa: E402
from difflm.data import build_dataset  # noqa: E402
from difflm.evaluation.generative import ar_nll, special_ids  # noqa: E402
from difflm.pipeline import DiffusionLM  # noqa: E402
from difflm.training.trainer import Trainer  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
# corpus -> (sequence length incl. [EOS], model, batch size, learning rate, bf16)
SETUPS = {"markov": (17, {"n_layer": 2, "n_head": 2, "d_model": 64}, 128, 2e-3, False),
          "shakespeare": (64, {"n_layer": 4, "n_head": 4, "d_model": 128}, 64, 1e-3, True)}


def run_config(d: Path, process: dict, steps: int, corpus: str = "markov") -> RunConfig:
    seq_len, model, batch, lr, bf16 = SETUPS[corpus]
    return RunConfig.from_dict({
        "name": process["type"],
        "data": {"corpus": "text", "path": str(d / "train.txt"), "valid_path": str(d / "valid.txt"),
                 "mode": "lines", "seq_len": seq_len, "cache_dir": str(d / "cache")},
        "tokenizer": {"type": "char"}, "model": model,
        "process": process,
        "train": {"batch_size": batch, "max_steps": steps, "lr": lr, "warmup_steps": 50, "ema": 0.99,
                  "eval_every": 10**6, "save_every": 10**6, "tensorboard": False, "bf16": bf16},
    })


def write_shakespeare_lines(d: Path) -> None:
    """Non-empty lines of tiny-Shakespeare; every 20th line is validation."""
    if not SHAKESPEARE.exists():
        sys.exit(f"{SHAKESPEARE} not found (the shared data directory)")
    lines = [ln.strip() for ln in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    (d / "train.txt").write_text("\n".join(ln for i, ln in enumerate(lines) if i % 20) + "\n", encoding="utf-8")
    (d / "valid.txt").write_text("\n".join(ln for i, ln in enumerate(lines) if i % 20 == 0) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", choices=sorted(SETUPS), default="markov")
    ap.add_argument("--attributes", default=None,
                    help="comma-separated (default: endswith:c,contains:ee,startswith:e on markov, "
                         "endswith:?,contains:thou,startswith:And on shakespeare)")
    ap.add_argument("--steps", type=int, default=600, help="training steps of the diffusion model")
    ap.add_argument("--ar-steps", type=int, default=None, help="training steps of the AR judge (default: --steps)")
    ap.add_argument("--classifier-steps", type=int, default=300)
    ap.add_argument("--pooling", choices=["attention", "mean"], default="attention", help="the classifiers' pooling")
    ap.add_argument("--num", type=int, default=400)
    ap.add_argument("--sample-steps", type=int, default=32)
    ap.add_argument("--scale", default="1", help="classifier weight; comma-separated for a sweep, e.g. 1,3,10")
    ap.add_argument("--lr", default="0.1", help="guidance Adagrad step size; comma-separated for a sweep")
    ap.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpm-solver"])
    ap.add_argument("--loss", default="elbo", choices=["elbo", "simple"],
                    help="the Gaussian model's training loss: its VDM bound, or Diffusion-LM's L_simple")
    ap.add_argument("--out", default=None, help="default: benchmarks/out/control[-shakespeare]")
    a = ap.parse_args()
    markov_source = a.corpus == "markov"
    attributes = a.attributes or ("endswith:c,contains:ee,startswith:e" if markov_source
                                  else "endswith:?,contains:thou,startswith:And")
    d = Path(a.out or ("benchmarks/out/control" if markov_source else f"benchmarks/out/control-{a.corpus}"))
    d.mkdir(parents=True, exist_ok=True)
    P = markov.transition_matrix(0)
    if not (d / "train.txt").exists():
        if markov_source:
            markov.write_corpus(d / "train.txt", P, 20000, 16, 1)
            markov.write_corpus(d / "valid.txt", P, 2000, 16, 2)
        else:
            write_shakespeare_lines(d)
    models = {}
    for name, proc, steps in (("gaussian", {"type": "gaussian", "embed_dim": 16, "loss": a.loss}, a.steps),
                              ("ar", {"type": "autoregressive"}, a.ar_steps or a.steps)):
        if not (d / name / "model.safetensors").exists():
            Trainer(run_config(d, proc, steps, a.corpus), d / name, progress=False, overwrite=True).fit()
        models[name] = DiffusionLM.from_pretrained(d / name, device="cpu")
    lm, ar = models["gaussian"], models["ar"]
    clfs, stats = [], {}
    for spec in attributes.split(","):
        path = d / "classifiers" / (spec.replace(":", "-") + ("" if a.pooling == "attention" else "-mean"))
        if (path / "classifier.json").exists():
            clf = NoisyClassifier.load(path)
            stats[spec] = json.loads((path / "stats.json").read_text()) if (path / "stats.json").exists() else {}
        else:
            clf, stats[spec] = train_classifier(lm, spec, steps=a.classifier_steps, pooling=a.pooling, log=None)
            clf.save(path)
            (path / "stats.json").write_text(json.dumps(stats[spec], indent=2))
        stats[spec]["base_rate"] = float(attribute_labels(lm, spec, "train").float().mean())
        clfs.append((spec, clf))
    sweep = [{"scale": float(s), "lr": float(r)} for s in a.scale.split(",") for r in a.lr.split(",")]
    rows = control_table(lm, clfs, ar, num=a.num, steps=a.sample_steps, sampler=a.sampler, guide_options=sweep,
                         log=lambda m: print(m, flush=True))
    meta = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "classifier_stats": stats}
    if markov_source:
        meta["source_entropy_per_char"] = markov.per_token_entropy(P, 16)
        print(f"source perplexity per character (exact): {math.exp(meta['source_entropy_per_char']):.2f}")
    else:
        valid = build_dataset(ar.run.data, ar.tokenizer, "valid")
        ref = valid.batch(list(range(min(len(valid), a.num)))).tokens
        nll, n = ar_nll(ar, ref, special_ids(ar.tokenizer))
        meta["valid_gen_ppl"] = math.exp(nll / n)
        print(f"held-out lines: perplexity per character under the AR baseline {meta['valid_gen_ppl']:.2f}")
    (d / "control.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| attribute | base rate (data) | classifier balanced acc. t=0.1 / 0.5 / 0.9 | scale | step size | "
          "success unguided | success guided | gen. ppl unguided | gen. ppl guided |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = stats[r["attribute"]]
        acc = " / ".join(f"{st[f'balanced_accuracy_t{t}']:.2f}" if f"balanced_accuracy_t{t}" in st else "-"
                         for t in (0.1, 0.5, 0.9))
        print(f"| {r['attribute']} | {st['base_rate']:.1%} | {acc} | {r['guide']['scale']:g} | {r['guide']['lr']:g} | "
              f"{r['unguided_success']:.1%} | {r['guided_success']:.1%} | "
              f"{r['unguided_gen_ppl']:.2f} | {r['guided_gen_ppl']:.2f} |")
    for r in rows:
        print(f"{r['attribute']} guided examples: {r['examples']}")


if __name__ == "__main__":
    main()
