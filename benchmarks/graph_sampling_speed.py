"""Decoding speed of the graph families' samplers (uniform diffusion and D3PM ancestral, SEDD analytic or Euler)
at a word-level vocabulary, this checkout against another one, interleaved in one run (ratios).

    python benchmarks/graph_sampling_speed.py RUN [RUN ...] [--against OLD_SRC] [--steps 32,128] [--num 16]
                                              [--length 128] [--repeat 3] [--threads 1] [--sampler NAME]

Each (run, steps) is timed ``--repeat`` times in a fresh process per source tree (this checkout's ``src`` and,
with --against, e.g. a ``git worktree`` of an older commit's ``src``), alternating, and the median kept. A run
folder can hold an untrained model: the time is the sampler's and the network's, not the model's quality.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TIME_ONE = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from difflm.pipeline import DiffusionLM
lm = DiffusionLM.from_pretrained(sys.argv[1], device="cpu")
kw = dict(num=int(sys.argv[3]), length=int(sys.argv[5]), steps=int(sys.argv[2]), seed=0, batch_size=int(sys.argv[3]),
          sampler=sys.argv[6] or None)
lm.generate(**{**kw, "num": 2, "batch_size": 2})  # warm-up
t = time.perf_counter()
lm.generate(**kw)
kind = getattr(lm.process, "transition", None) or lm.process.graph.kind
print(json.dumps({"seconds": time.perf_counter() - t, "family": f"{lm.process.family} ({kind})"
                  + (f", {sys.argv[6]}" if sys.argv[6] else "")}))
"""


def time_once(src: Path, run: str, steps: int, num: int, threads: int, length: int, sampler: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    args = [run, str(steps), str(num), str(threads), str(length), sampler]
    out = subprocess.run([sys.executable, "-c", TIME_ONE, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--against", type=Path, default=None, help="another checkout's src folder")
    ap.add_argument("--steps", default="32,128")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sampler", default="", help="default: each run's own (e.g. euler for a SEDD run)")
    a = ap.parse_args()
    here = Path(__file__).resolve().parents[1] / "src"
    trees = {"this": here} | ({"against": a.against.resolve()} if a.against else {})
    print("| run | family | steps | " + " | ".join(f"s/sample ({k})" for k in trees)
          + (" | speed-up |" if a.against else " |"))
    print("|---|---|---:|" + "---:|" * (len(trees) + bool(a.against)))
    for run in a.runs:
        for steps in (int(s) for s in a.steps.split(",")):
            times: dict[str, list[float]] = {k: [] for k in trees}
            fam = ""
            for _ in range(a.repeat):
                for k, src in trees.items():
                    r = time_once(src, run, steps, a.num, a.threads, a.length, a.sampler)
                    times[k].append(r["seconds"] / a.num)
                    fam = r["family"]
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = " | ".join(f"{med[k]:.4f}" for k in trees)
            ratio = f" | {med['against'] / med['this']:.2f}× |" if a.against else " |"
            print(f"| {Path(run).name} | {fam} | {steps} | {cells}{ratio}", flush=True)


if __name__ == "__main__":
    main()
