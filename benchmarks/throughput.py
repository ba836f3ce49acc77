"""Training and sampling speed on this machine.

    python benchmarks/throughput.py --model-dir benchmarks/out/runs/ptb-mdlm

1. Matrix-multiply peak (fp32 and bf16), the denominator of model FLOP utilisation (MFU).
2. Training throughput (tokens/s) and MFU of the ptb-*-small presets (4 layers, d=256, 128 tokens,
   batch 32): forward + backward + AdamW, fp32 and bf16 autocast, masked diffusion and AR.
   FLOPs counted are those the step performs: 6 × (matmul parameters used per token) + attention
   (12 · L · d per layer and token for a bidirectional mask, half that causal), with the output head counted
   only at the positions where the loss needs it (masked positions for MDLM, every position for AR).
3. Sampling throughput and network calls per sequence for the ancestral and cached masked samplers at
   64/256/1024 steps (and the AR sampler) with the trained model in --model-dir.
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

from difflm.components import build_components
from difflm.config import load_config
from difflm.data import build_dataset, build_tokenizer, load_lines
from difflm.pipeline import DiffusionLM


def best_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(n: int = 2048) -> dict[str, float]:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out[str(dtype).split(".")[-1]] = 2 * n**3 / best_time(lambda: a @ b, 5) / 1e9  # noqa: B023
    return out


def step_flops(model, seq_len: int, tokens: int, head_positions: int, causal: bool) -> float:
    """Training FLOPs of one step (forward + backward = 3 × forward)."""
    cfg = model.cfg
    d, hidden = cfg.d_model, int(cfg.mlp_ratio * cfg.d_model)
    body = cfg.n_layer * (4 * d * d + 2 * d * hidden)  # qkv + proj + MLP weights per token
    attn = cfg.n_layer * 2 * seq_len * d * (0.5 if causal else 1.0)  # QKᵀ and AV, multiply-adds per token
    fwd = 2 * (body + attn) * tokens + 2 * d * cfg.vocab_size * head_positions
    return 3 * fwd


def train_speed(preset: str, bf16: bool, steps: int) -> dict:
    run = load_config(preset, [f"train.bf16={str(bf16).lower()}"])
    tok = build_tokenizer(run.tokenizer, load_lines(run.data, "train"))
    data = build_dataset(run.data, tok, "train")
    model, process = build_components(run, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B = run.train.batch_size
    batch = data.batch(torch.arange(B).numpy())
    batch.u = torch.rand(B, dtype=torch.float64)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    head_positions = []

    def step():
        with amp:
            terms = process.loss(model, batch)
        terms.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        head_positions.append(int((terms != 0).sum()) if process.family == "masked" else batch.n_tokens)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sec = (time.perf_counter() - t0) / steps
    tokens = B * run.data.seq_len
    flops = step_flops(model, run.data.seq_len, tokens, sum(head_positions[1:]) / steps, process.family != "masked")
    return {"preset": preset, "bf16": bf16, "seconds_per_step": sec, "tokens_per_s": tokens / sec,
            "gflops_per_s": flops / sec / 1e9}


def sample_speed(model_dir: Path, num: int, steps_list: list[int]) -> list[dict]:
    lm = DiffusionLM.from_pretrained(model_dir)
    L = lm.seq_len
    rows = []
    for steps in steps_list:
        for sampler in ("ancestral", "cached"):
            t0 = time.perf_counter()
            g = lm.generate(num, L, steps=steps, sampler=sampler, seed=0, batch_size=num)
            sec = time.perf_counter() - t0
            rows.append({"sampler": sampler, "steps": steps, "length": L, "num": num, "seconds": sec,
                         "tokens_per_s": num * L / sec, "nfe_per_sequence": float(g.nfe.double().mean())})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("benchmarks/out/runs/ptb-mdlm"))
    ap.add_argument("--ar-dir", type=Path, default=Path("benchmarks/out/runs/ptb-ar"))
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    a = ap.parse_args()
    res = {"meta": {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
                    "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}}
    res["peak_gflops"] = matmul_peak()
    print("peak", res["peak_gflops"], flush=True)
    res["train"] = []
    for preset in ("ptb-mdlm-small", "ptb-ar-small"):
        for bf16 in (False, True):
            r = train_speed(preset, bf16, a.train_steps)
            r["mfu"] = r["gflops_per_s"] / res["peak_gflops"]["bfloat16" if bf16 else "float32"]
            res["train"].append(r)
            print(r, flush=True)
    res["sample"] = sample_speed(a.model_dir, a.num, [64, 256, 1024])
    if a.ar_dir.is_dir():
        lm = DiffusionLM.from_pretrained(a.ar_dir)
        t0 = time.perf_counter()
        g = lm.generate(a.num, lm.seq_len, seed=0, batch_size=a.num)
        sec = time.perf_counter() - t0
        res["sample"].append({"sampler": "autoregressive", "steps": lm.seq_len, "length": lm.seq_len, "num": a.num,
                              "seconds": sec, "tokens_per_s": a.num * lm.seq_len / sec,
                              "nfe_per_sequence": float(g.nfe.double().mean())})
        print(res["sample"][-1], flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "throughput.json").write_text(json.dumps(res, indent=2))
    print(markdown(res))


def markdown(res: dict) -> str:
    pk = res["peak_gflops"]
    out = [f"matmul peak: {pk['float32']:.0f} GFLOP/s fp32, {pk['bfloat16']:.0f} GFLOP/s bf16", "",
           "| preset | precision | s/step | tokens/s | GFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    for r in res["train"]:
        out.append(f"| {r['preset']} | {'bf16' if r['bf16'] else 'fp32'} | {r['seconds_per_step']:.3f} | "
                   f"{r['tokens_per_s']:,.0f} | {r['gflops_per_s']:.1f} | {100 * r['mfu']:.1f}% |")
    out += ["", "| sampler | steps | network calls / sequence | tokens/s | seconds for the batch |",
            "|---|---|---|---|---|"]
    for r in res["sample"]:
        out.append(f"| {r['sampler']} | {r['steps']} | {r['nfe_per_sequence']:.1f} | {r['tokens_per_s']:,.1f} | "
                   f"{r['seconds']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
