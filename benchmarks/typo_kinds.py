"""Which typos the typo-correction models fix, by kind: codespell misspellings against keyboard typos.

    python benchmarks/typo_kinds.py [--out benchmarks/out/edit-typos-60] [--test 500] [--threads 1]

Reads the run folders and data of ``benchmarks/edit_typos.py``. The typo generator changes words, never their
number, so noisy and clean words pair up by position. A noisy word that codespell lists as a misspelling of its
clean word is a misspelling, any other changed word a keyboard typo. It counts as fixed when a shortest word
alignment of the output to the clean sentence keeps its clean word (``edit_typos._kept``), as left when one to the
noisy sentence keeps the typo, and as rewritten wrong otherwise (changed into another wrong word, or lost). Each
model is decoded as its best row in RESULTS.md: the edit model greedily with the keep bias given, the masked and AR
models greedily, a long sentence in windows as ``edit_typos.correct`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from edit_typos import _kept, correct  # noqa: E402 (benchmarks/ is the script's folder)

from difflm.data.typos import misspellings
from difflm.pipeline import DiffusionLM


def typo_kinds(noisy: str, clean: str, mis: dict[str, tuple[str, ...]]) -> dict[int, str]:
    """Position of each changed word -> "codespell" or "keyboard"."""
    return {i: "codespell" if a in mis.get(b, ()) else "keyboard"
            for i, (a, b) in enumerate(zip(noisy.split(), clean.split())) if a != b}


def share(seen: int, fixed: int, left: int) -> str:
    """"fixed% / left% / rewritten-wrong% of seen"."""
    n = max(seen, 1)
    return f"{100 * fixed / n:.1f}% / {100 * left / n:.1f}% / {100 * (seen - fixed - left) / n:.1f}% of {seen}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/edit-typos-60"))
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--models", default="edit,ar,masked")
    ap.add_argument("--keep-bias", type=float, default=1.0, help="the edit models' keep bias (chosen on valid)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [json.loads(x) for x in (a.out / "data" / "test.jsonl").read_text().splitlines()][: a.test]
    noisy, clean = [r["source"] for r in rows], [r["target"] for r in rows]
    mis = misspellings()
    print("| model | codespell misspellings: fixed / left / rewritten wrong | keyboard typos: fixed / left / rewritten "
          "wrong | outputs with another word count |\n|---|---:|---:|---:|")
    for name in a.models.split(","):
        opts = {"greedy": True} | ({"keep_bias": a.keep_bias} if name.startswith("edit") else {})
        lm = DiffusionLM.from_pretrained(a.out / name)
        outs = correct(lm, noisy, opts)[0]
        seen = {"codespell": 0, "keyboard": 0}
        fixed, left = dict(seen), dict(seen)
        for n, c, o in zip(noisy, clean, outs):
            kept, same = _kept(o.split(), c.split()), _kept(o.split(), n.split())  # clean / noisy words kept
            for i, kind in typo_kinds(n, c, mis).items():
                seen[kind] += 1
                fixed[kind] += i in kept
                left[kind] += i in same
        moved = sum(len(o.split()) != len(c.split()) for o, c in zip(outs, clean))

        cells = [share(seen[k], fixed[k], left[k]) for k in ("codespell", "keyboard")]
        print(f"| {name} {opts} | {cells[0]} | {cells[1]} | {moved} of {len(outs)} |", flush=True)


if __name__ == "__main__":
    main()
