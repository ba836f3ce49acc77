"""What computing x̂0 only where a masked sampler draws saves: every masked sampler, in one run, with the
library's route (output head, softmax and carry-over at the drawn positions: ``log_probs(select=...)``) and
with the route the samplers used before (the whole (B, L, V) tensor, then indexed), on the same model and seed.

    python benchmarks/x0_select.py                       # the ptb-mdlm-small shape: 4 layers, d=256, L=128, V=10,004

Speed does not depend on the weights, so the network is untrained (random, spread-out predictions); the
script also checks that both routes draw the same tokens. Prints a Markdown table (seconds per batch, the
ratio, tokens equal) and writes <out>/x0-select.json.
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

from difflm.diffusion import MaskedDiffusion
from difflm.models import Transformer, TransformerConfig
from difflm.sampling import Conditioning, get_sampler

CASES = [("ancestral", 64, {}), ("ancestral", 256, {}), ("first-hitting", 0, {}), ("remdm", 64, {"eta": 0.02}),
         ("confidence", 64, {}), ("cached", 256, {})]


class FullRoute(MaskedDiffusion):
    """The route before: x̂0 over every position, then the selected rows."""

    def log_probs(self, model, xt, t, select=None):
        full = super().log_probs(model, xt, t)
        return full if select is None else full[select]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=10004)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    a = ap.parse_args()
    V, L = a.vocab, a.length
    mask, pad = V - 2, V - 1
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=V, max_len=L, n_layer=a.layers, n_head=4, d_model=a.width))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.eval()
    routes = {"selected": MaskedDiffusion(V, mask, pad), "full": FullRoute(V, mask, pad)}
    rows = []
    for name, steps, opts in CASES:
        r = {"sampler": name, "steps": steps or None}
        tokens = {}
        for route, proc in routes.items():
            cond = Conditioning.unconditional(a.batch, L, fill=mask)
            t0 = time.perf_counter()
            out = get_sampler(name, proc, **opts)(model, proc, cond, steps=steps, seed=1)
            r[f"{route}_s"] = time.perf_counter() - t0
            r["nfe"] = float(out.nfe.float().mean())
            tokens[route] = out.tokens
        r["speedup"] = r["full_s"] / r["selected_s"]
        r["same_tokens"] = bool(torch.equal(tokens["selected"], tokens["full"]))
        rows.append(r)
        print(json.dumps(r), flush=True)
    meta = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "shape": {"vocab": V, "length": L, "layers": a.layers, "width": a.width, "batch": a.batch}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "x0-select.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['machine']}; batch {a.batch} × {L} tokens, V = {V}, {a.layers} layers, d = {a.width}")
    print("| sampler | steps | NFE / sequence | s, full x̂0 | s, selected x̂0 | speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps'] or '-'} | {r['nfe']:.1f} | {r['full_s']:.2f} | {r['selected_s']:.2f} | "
              f"{r['speedup']:.2f}× | {'yes' if r['same_tokens'] else 'NO'} |")


if __name__ == "__main__":
    main()
