"""Peak memory of reading a corpus: training the tokenizer and tokenizing the train split into the memory-mapped
token cache, in a fresh process per case, next to the size of the cache it writes (issue 20: a 50 MB
single-line corpus used to peak at 16.7 GB).

    python benchmarks/data_memory.py                         # 50 MB single line, 500 MB many lines
    python benchmarks/data_memory.py --src /tmp/old/src --single-mb 5 --lines-mb 0   # another difflm tree

Each case: peak RSS (ru_maxrss) of the process, minus nothing (the baseline row is `import difflm, torch`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
from difflm.config import RunConfig
from difflm.data import build_dataset, build_tokenizer, load_lines
path, kind, mode, cache = sys.argv[1:5]
t0 = time.time()
out = {}
if path != "-":
    run = RunConfig.from_dict({"data": {"corpus": "text", "path": path, "mode": mode, "seq_len": 128,
                                        "valid_fraction": 0.01, "cache_dir": cache},
                               "tokenizer": {"type": kind, "vocab_size": 4096}})
    tok = build_tokenizer(run.tokenizer, load_lines(run.data, "train"))
    ds = build_dataset(run.data, tok, "train")
    out = {"tokens": int(np.prod(ds.tokens.shape)), "cache_mb": ds.tokens.nbytes / 2**20}
out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["seconds"] = time.time() - t0
print(json.dumps(out))
"""

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there their one all we can has more will would been who its time if so out when "
         "two also what up no into only said new other some could than then them these any may now first").split()


def write_corpus(path: Path, mb: float, line_words: int | None) -> None:
    """About ``mb`` MB of text: one line (line_words None) or lines of ``line_words`` words."""
    import random

    rng = random.Random(0)
    target, size = int(mb * 2**20), 0
    with open(path, "w") as f:
        while size < target:
            n = line_words or 10_000
            chunk = " ".join(rng.choice(WORDS) for _ in range(n))
            chunk += "\n" if line_words else " "
            f.write(chunk)
            size += len(chunk)


def run_case(src: str | None, corpus: str, kind: str, mode: str, cache: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if src:
        env["PYTHONPATH"] = src
    p = subprocess.run([sys.executable, "-c", CHILD, corpus, kind, mode, cache], env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["killed"])[-1], "returncode": p.returncode}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--single-mb", type=float, default=50, help="size of the single-line corpus (0: skip)")
    ap.add_argument("--lines-mb", type=float, default=500, help="size of the many-line corpus (0: skip)")
    ap.add_argument("--src", default=None, help="the src/ folder of another difflm tree to measure instead")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="data-memory-"))
    rows = [{"case": "baseline: import difflm, torch", **run_case(a.src, "-", "-", "-", "-")}]
    cases = []
    if a.single_mb:
        write_corpus(d / "single.txt", a.single_mb, None)
        cases += [(f"{a.single_mb:g} MB, one line", d / "single.txt", k, m)
                  for k, m in (("char", "packed"), ("word", "packed"), ("bpe", "packed"))]
    if a.lines_mb:
        write_corpus(d / "lines.txt", a.lines_mb, 20)
        cases += [(f"{a.lines_mb:g} MB, lines of 20 words", d / "lines.txt", "word", "packed")]
    for name, path, kind, mode in cases:
        t0 = time.time()
        r = run_case(a.src, str(path), kind, mode, str(d / f"cache-{kind}-{path.stem}"))
        rows.append({"case": name, "tokenizer": kind, "mode": mode, **r, "wall_s": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{date.today()}, {platform.processor() or platform.machine()}, command: python {' '.join(sys.argv)}\n")
    base = rows[0]["peak_mb"]
    print("| corpus | tokenizer | tokens | token cache (MB) | peak RSS (MB) | peak above the import (MB) | "
          "that / cache | s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| (import difflm, torch) | - | - | - | {base:.0f} | - | - | - |")
    for r in rows[1:]:
        if "error" in r:
            print(f"| {r['case']} | {r['tokenizer']} | failed: {r['error']} | | | | | |")
            continue
        extra = r["peak_mb"] - base
        print(f"| {r['case']} | {r['tokenizer']} | {r['tokens']:,} | {r['cache_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{extra:.0f} | {extra / r['cache_mb']:.1f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
