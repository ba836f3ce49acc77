"""Does a seq2seq model read its source? Its bound on the validation targets with the source given and with
the source replaced by [PAD] (what classifier-free guidance's condition dropout shows the model), split into
the target's own tokens and the [EOS] fill after them.

    python benchmarks/seq2seq_source_use.py benchmarks/out/kjv2web/runs/kjv2web-{mdlm,ar}

A model that copies and edits the source scores its target tokens far lower with the source than without; an
unconditional language model scores them the same.
"""

from __future__ import annotations

import argparse

import torch

from difflm.data import build_dataset
from difflm.data.datasets import drop_condition
from difflm.models.seq2seq import bind_source
from difflm.pipeline import DiffusionLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--rows", type=int, default=64, help="validation pairs")
    ap.add_argument("--draws", type=int, default=8, help="time draws per row (diffusion families)")
    a = ap.parse_args()
    print("| model | target nats/token, with source | without source | [EOS] fill nats/position, with / without |")
    print("|---|---|---|---|")
    for run in a.runs:
        lm = DiffusionLM.from_pretrained(run, device="cpu")
        if lm.run.data.mode != "pairs":
            raise SystemExit(f"{run} is not a seq2seq (pairs) model")
        tok = lm.tokenizer
        valid = build_dataset(lm.run.data, tok, "valid")
        b = valid.batch(list(range(min(a.rows, len(valid)))))
        fill = b.loss_mask & (b.tokens == tok.eos_id)
        fill &= fill.cumsum(-1) > 1  # the first [EOS] ends the target and belongs to it
        words = b.loss_mask & ~fill
        draws = 1 if lm.process.family == "autoregressive" else a.draws  # the AR bound is exact
        cells = {}
        for name, batch in (("with", b), ("without", drop_condition(b, torch.ones(len(b.tokens), dtype=torch.bool),
                                                                     tok.pad_id, tok.bos_id))):
            g = torch.Generator().manual_seed(0)
            tot = torch.zeros(b.tokens.shape, dtype=torch.float64)
            for _ in range(draws):
                with torch.no_grad():
                    net = bind_source(lm.model, lm.process, batch.tokens)  # encoder-decoders read this source
                    tot += lm.process.bound_terms(net, batch, g).double() / draws
            cells[name] = (float(tot[words].sum() / words.sum()), float(tot[fill].sum() / fill.sum().clamp_min(1)))
        print(f"| {lm.run.name} | {cells['with'][0]:.3f} | {cells['without'][0]:.3f} | "
              f"{cells['with'][1]:.3f} / {cells['without'][1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
