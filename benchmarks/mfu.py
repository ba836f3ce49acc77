"""Training throughput and model FLOPs utilisation (MFU) of the SmolLM2-135M backbone in difflm, against the
peak this machine measures for the same dtype.

    python benchmarks/mfu.py [--steps 8] [--batch 8] [--seq-len 128]

Peak: the best of several square matmuls (2048³ and 4096³) in bf16 (and float32 for scale), FLOP/s = 2n³/s.
Model FLOPs per trained token (PaLM's accounting, App. B): 6·N for the N parameters that multiply (every
weight matrix, the tied output head included; the embedding lookup is free) plus 12·n_layer·d_model·L for the
attention scores and values at sequence length L; for block diffusion the [x_t, x0] pass reads 2L tokens per
target token, counted as tokens processed. MFU = FLOPs per token × tokens/s ÷ peak.
A training step is the adaptation preset's (smollm2-135m-mdlm-ptb: masked family, bidirectional, shift) in bf16
autocast, AdamW, after two warm-up steps. Run alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

from difflm.components import build_components
from difflm.config import load_config
from difflm.data.tokenizers import load_hf
from difflm.diffusion.base import Batch
from difflm.precision import autocast


def peak(dtype: torch.dtype, n: int, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args()
    peaks = {name: max(peak(dt, n) for n in (2048, 4096)) for name, dt in
             (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    run = load_config("smollm2-135m-mdlm-ptb", [f"data.seq_len={a.seq_len}"])
    tok = load_hf("smollm2-135m")
    model, process = build_components(run, tok)
    model.pretrained_init()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n_mul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2)  # the tied table is the head
    cfg = model.cfg
    flops_token = 6 * n_mul + 12 * cfg.n_layer * cfg.d_model * a.seq_len
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(a.steps + 2):
        x = torch.randint(0, 49152, (a.batch, a.seq_len), generator=g)
        b = Batch(x, torch.ones_like(x, dtype=torch.bool), torch.zeros_like(x, dtype=torch.bool))
        t0 = time.perf_counter()
        with autocast("cpu", True):
            terms = process.loss(model, b)
        terms.float().sum().div(b.n_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    tps = a.batch * a.seq_len * len(times) / sum(times)
    out = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads", "torch": torch.__version__,
           "peak_tflops": {k: v / 1e12 for k, v in peaks.items()}, "params_multiplying": n_mul,
           "gflops_per_token": flops_token / 1e9, "tokens_per_s": tps,
           "mfu_bf16": flops_token * tps / peaks["bf16"], "mfu_vs_fp32_peak": flops_token * tps / peaks["fp32"]}
    print(json.dumps(out, indent=2))
    print(f"\n| backbone | tokens/s (train, bf16) | GFLOP/token | model TFLOP/s | measured bf16 peak TFLOP/s | MFU |\n"
          f"|---|---:|---:|---:|---:|---:|\n| SmolLM2-135M (llama) | {tps:.0f} | {flops_token / 1e9:.2f} | "
          f"{flops_token * tps / 1e12:.3f} | {peaks['bf16'] / 1e12:.3f} | {out['mfu_bf16']:.1%} |")


if __name__ == "__main__":
    main()
