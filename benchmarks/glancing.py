"""What glancing training (GLAT, `process.loss: glat`) shows a masked seq2seq or captioning model, measured on its
validation rows: how many target positions its first pass over the all-[MASK] row gets right, how much of each row
stays masked after ⌊λ·d⌋ of the d wrong ones are revealed, and the first pass's cross-entropy (the row decoding
starts from).

    python benchmarks/glancing.py RUN [RUN ...] [--rows 64] [--ratio 0.5]

A model whose first pass stays poor keeps being shown much of its target, so it trains on partly revealed rows and
never on the all-[MASK] row (RESULTS.md, "DiffusER revising the AR captioner's captions, and glancing masks").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from difflm.data import build_dataset
from difflm.diffusion.masked import MaskedDiffusion
from difflm.models.seq2seq import bind_source
from difflm.pipeline import DiffusionLM


@torch.no_grad()
def glancing_stats(lm: DiffusionLM, rows: int = 64, ratio: float | None = None) -> dict:
    """First-pass accuracy (all free positions, and those not holding [EOS]: the words), the masked share after glancing
    at λ = ``ratio`` (default: the run's), and the first pass's mean cross-entropy (nats), on ``rows`` valid rows."""
    p = lm.process
    if not isinstance(p, MaskedDiffusion):
        raise SystemExit(f"glancing: {lm.run.name} is a {p.family} model; glancing applies to the masked family")
    if ratio is not None:  # the same process with another λ
        p = copy.copy(p)
        p.options = dataclasses.replace(p.options, glance_ratio=ratio)
    ds = build_dataset(lm.run.data, lm.tokenizer, "valid")
    b = ds.batch(list(range(min(rows, len(ds)))))
    n = b.tokens.shape[0]
    b.rows, b.seed, b.step = torch.arange(n), 0, 0
    net = bind_source(lm.model.eval(), p, b.tokens, getattr(b, "images", None))
    x0 = b.tokens
    free, logits = p.first_pass(net, b)
    right = logits.argmax(-1) == x0[free]
    words = (x0 != p.eos_id)[free]  # the caption or translation itself, not the [EOS] fill after it
    xt = p.glancing_corrupt(net, b)
    return {"run": lm.run.name, "rows": n, "free_per_row": float(free.sum(-1).float().mean()),
            "first_pass_accuracy": float(right.float().mean()),
            "first_pass_accuracy_words": float(right[words].float().mean()),
            "first_pass_ce": float(F.cross_entropy(logits, x0[free])),
            "masked_after_glancing": float(((xt == p.mask_id) & free).sum() / free.sum()),
            "glance_ratio": float(p.options.glance_ratio)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=None, help="λ (default: each run's process.glance_ratio)")
    a = ap.parse_args()
    for run in a.runs:
        print(json.dumps(glancing_stats(DiffusionLM.from_pretrained(run, device="cpu"), a.rows, a.ratio)), flush=True)


if __name__ == "__main__":
    main()
