"""Diffusion-LM control table: attribute success rate and fluency, guided vs unguided, on one model.

    python benchmarks/control.py --attributes endswith:c,contains:ee,startswith:e

Trains (or reuses, in --out) a Gaussian embedding diffusion model (Diffusion-LM, 16-dim embeddings, VDM
bound) and an AR baseline on the first-order Markov source of tests/markov.py (16-character lines, known
entropy), an attribute classifier on noisy embeddings for each attribute (`difflm train-classifier`), then
samples --num lines unguided and guided (`difflm control`): success = share of lines with the attribute,
fluency = generative perplexity under the AR baseline (the source's own perplexity is printed for reference).
Writes benchmarks/out/control.json and prints a Markdown table.
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
from difflm.control import NoisyClassifier, control_table, train_classifier  # noqa: E402
from difflm.pipeline import DiffusionLM  # noqa: E402
from difflm.training.trainer import Trainer  # noqa: E402


def run_config(d: Path, process: dict, steps: int) -> RunConfig:
    return RunConfig.from_dict({
        "name": process["type"],
        "data": {"corpus": "text", "path": str(d / "train.txt"), "valid_path": str(d / "valid.txt"),
                 "mode": "lines", "seq_len": 17, "cache_dir": str(d / "cache")},
        "tokenizer": {"type": "char"}, "model": {"n_layer": 2, "n_head": 2, "d_model": 64},
        "process": process,
        "train": {"batch_size": 128, "max_steps": steps, "lr": 2e-3, "warmup_steps": 50, "ema": 0.99,
                  "eval_every": 10**6, "save_every": 10**6, "tensorboard": False, "bf16": False},
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attributes", default="endswith:c,contains:ee,startswith:e")
    ap.add_argument("--steps", type=int, default=600, help="training steps of the diffusion and AR models")
    ap.add_argument("--classifier-steps", type=int, default=300)
    ap.add_argument("--num", type=int, default=400)
    ap.add_argument("--sample-steps", type=int, default=32)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/out/control")
    a = ap.parse_args()
    d = Path(a.out)
    d.mkdir(parents=True, exist_ok=True)
    P = markov.transition_matrix(0)
    if not (d / "train.txt").exists():
        markov.write_corpus(d / "train.txt", P, 20000, 16, 1)
        markov.write_corpus(d / "valid.txt", P, 2000, 16, 2)
    models = {}
    for name, proc in (("gaussian", {"type": "gaussian", "embed_dim": 16, "loss": "elbo"}),
                       ("ar", {"type": "autoregressive"})):
        if not (d / name / "model.safetensors").exists():
            Trainer(run_config(d, proc, a.steps), d / name, progress=False, overwrite=True).fit()
        models[name] = DiffusionLM.from_pretrained(d / name, device="cpu")
    lm, ar = models["gaussian"], models["ar"]
    clfs, stats = [], {}
    for spec in a.attributes.split(","):
        path = d / "classifiers" / spec.replace(":", "-")
        if (path / "classifier.json").exists():
            clf = NoisyClassifier.load(path)
        else:
            clf, stats[spec] = train_classifier(lm, spec, steps=a.classifier_steps, log=None)
            clf.save(path)
        clfs.append((spec, clf))
    rows = control_table(lm, clfs, ar, num=a.num, steps=a.sample_steps, guide_options={"scale": a.scale})
    meta = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "source_entropy_per_char": markov.per_token_entropy(P, 16), "classifier_stats": stats}
    (d.parent / "control.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"source perplexity per character (AR-model-free, exact): {math.exp(meta['source_entropy_per_char']):.2f}")
    print("| attribute | base rate (data) | success unguided | success guided | gen. ppl unguided | gen. ppl guided |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = stats.get(r["attribute"], {}).get("base_rate", float("nan"))
        print(f"| {r['attribute']} | {base:.1%} | {r['unguided_success']:.1%} | {r['guided_success']:.1%} | "
              f"{r['unguided_gen_ppl']:.2f} | {r['guided_gen_ppl']:.2f} |")


if __name__ == "__main__":
    main()
