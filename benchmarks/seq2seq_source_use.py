"""Does a seq2seq model read its source? Its bound on the validation targets with the source given and with
the source replaced by [PAD] (what classifier-free guidance's condition dropout shows the model), split into
the target's own tokens and the [EOS] fill after them.

    python benchmarks/seq2seq_source_use.py benchmarks/out/kjv2web/runs/kjv2web-{mdlm,ar}

A model that copies and edits the source scores its target tokens far lower with the source than without; an
unconditional language model scores them the same.

    python benchmarks/seq2seq_source_use.py RUN... --ratios 0.25,0.5,0.75,1

adds, for time-free masked models, −log p_θ(x0ⁱ | x_t) of the masked target tokens when a fraction r of the target
(its tokens and fill) is [MASK], with and without the source, on the same masks: where the source should matter
most (r = 1: nothing of the target left to read) and where the target's own context can stand in for it.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from difflm.data import build_dataset
from difflm.data.datasets import drop_condition
from difflm.models.seq2seq import bind_source
from difflm.pipeline import DiffusionLM


def nll_at_ratio(lm: DiffusionLM, b, words: torch.Tensor, r: float, draws: int) -> tuple[float, float]:
    """Mean −log p_θ(x0ⁱ | x_t) (nats) over the target tokens ``words`` (B, L) that are masked when each modelled
    position is [MASK] with probability r, with the source and with it replaced by [PAD] (the same masks)."""
    tok = lm.tokenizer
    out = []
    for batch in (b, drop_condition(b, torch.ones(len(b.tokens), dtype=torch.bool), tok.pad_id, tok.bos_id)):
        g = torch.Generator().manual_seed(0)
        tot, n = 0.0, 0
        net = bind_source(lm.model, lm.process, batch.tokens)  # the source encoded once, read by every draw
        for _ in range(draws):
            masked = (torch.rand(b.tokens.shape, generator=g) < r) & batch.loss_mask
            xt = torch.where(masked, torch.full_like(batch.tokens, tok.mask_id), batch.tokens)
            sel = masked & words
            with torch.no_grad():
                logits = lm.process.subs_logits(net, xt, None, select=sel)
            tot += float(F.cross_entropy(logits, batch.tokens[sel], reduction="sum"))
            n += int(sel.sum())
        out.append(tot / max(n, 1))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--rows", type=int, default=64, help="validation pairs")
    ap.add_argument("--draws", type=int, default=8, help="time draws per row (diffusion families)")
    ap.add_argument("--ratios", default="", help="masked models: also the masked target tokens' nats at these "
                                                  "mask ratios (e.g. 0.25,0.5,0.75,1), with and without the source")
    a = ap.parse_args()
    ratios = [float(r) for r in a.ratios.split(",") if r]
    by_ratio = []
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
        if ratios and lm.process.family == "masked" and not lm.process.time_conditioning:
            by_ratio.append((lm.run.name, [nll_at_ratio(lm, b, words, r, a.draws) for r in ratios]))
    if by_ratio:
        print("\nMasked target tokens, nats/token with source / without, by the fraction r of the target masked:\n")
        print("| model | " + " | ".join(f"r = {r:g}" for r in ratios) + " |")
        print("|---|" + "---:|" * len(ratios))
        for name, cells in by_ratio:
            print(f"| {name} | " + " | ".join(f"{w:.2f} / {wo:.2f}" for w, wo in cells) + " |")


if __name__ == "__main__":
    main()
