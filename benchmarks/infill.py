"""Infilling PTB sentences: how well each model fills a blanked span given the text on both sides.

    python benchmarks/infill.py --runs ar=$O/ar,bd3lm=$O/bd3lm,smollm2-bd3lm-cc=$O/smollm2-bd3lm-cc \
        --judge $O/ar --num 24 --candidates 4

For ``--num`` validation sentences of 12–40 words, the ``--span`` words in the middle are blanked; each model fills
as many of its own tokens as those words take in its tokenizer (the oracle length, so tokenizers of different
granularity are compared on the same words). Each model fills every sentence twice from the same seed: its first
draw alone, and the likeliest of ``--candidates`` draws under its own likelihood of the whole sentence
(``DiffusionLM.infill(candidates=N)``: exact for AR and clean-causal models, the bound otherwise). Models that read
only the text before a gap (AR, block diffusion, clean-causal adaptations) see the text after it only through that
choice; a masked model with bidirectional attention reads both sides in every call.

Reported per model and setting: the share of blanked words recovered (position by position), the AR judge's
perplexity per word of the whole filled sentence (three times: a word outside PTB's vocabulary as the judge's
[UNK]; as <unk>, PTB's own convention; and as <unk> only where an English word list has it, a non-word staying
[UNK]: ``adaptation.judge_ppl``) and SmolLM2's per token (the original sentences' under both, for scale; the AR
judge favours the AR row when it is also a model, SmolLM2 favours its descendants), and seconds per sentence. Block
models fill with ``--block-order`` (left to right by default: the order an adapted clean-causal model reads best).
Writes ``<out>/infill-<runs>.json`` and prints Markdown. Run it alone (it times things).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from difflm.data.corpora import ptb_lines
from difflm.pipeline import DiffusionLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptation import judge_ppl, read_dictionary  # noqa: E402  (the same judge as the adaptation tables)


def blanked(lines: list[str], num: int, span: int) -> list[tuple[list[str], list[str], list[str]]]:
    """(prefix words, blanked words, suffix words) of the first ``num`` lines of 12–40 words, the blank centred."""
    out = []
    for line in lines:
        w = line.split()
        if 12 <= len(w) <= 40:
            a = (len(w) - span) // 2
            out.append((w[:a], w[a : a + span], w[a + span :]))
        if len(out) == num:
            break
    return out


def template(lm: DiffusionLM, prefix: list[str], gap: list[str], suffix: list[str]) -> tuple[str, int]:
    """The infill text for ``lm`` and the number of its tokens the blanked words take. A word tokenizer splits on
    spaces; a byte-level BPE carries each word's leading space in its first token, so its gap follows the prefix
    directly and its fill starts with the space."""
    p, s = " ".join(prefix), " ".join(suffix)
    if lm.tokenizer.kind == "word":
        return f"{p} ___ {s}", len(lm.encode_text(" ".join(gap)))
    return f"{p}___ {s}", len(lm.encode_text(f"{p} {' '.join(gap)}")) - len(lm.encode_text(p))


def recovered(filled: str, prefix: list[str], gap: list[str], suffix: list[str]) -> int:
    """How many blanked words the fill puts back at their own place."""
    w = filled.split()
    fill = w[len(prefix) : len(w) - len(suffix)]
    return sum(a == b for a, b in zip(fill, gap))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="name=run_dir,... (the rows of the table)")
    ap.add_argument("--judge", type=Path, required=True, help="the word-level AR run that judges (ptb-ar-small)")
    ap.add_argument("--num", type=int, default=24)
    ap.add_argument("--span", type=int, default=4, help="words blanked per sentence")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--steps", type=int, default=128, help="masked models' steps (block and AR: one token a call)")
    ap.add_argument("--block-order", default="left-to-right")
    ap.add_argument("--batch", type=int, default=8, help="sentences sampled as one batch")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--dictionary", type=Path, default=Path("/usr/share/dict/words"),
                    help="an English word list for the third reading of the AR judge (apt-get install wamerican)")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from difflm.evaluation.external import load_scorer

    runs = dict(kv.split("=", 1) for kv in a.runs.split(","))
    scorer = load_scorer("smollm2")
    dictionary = read_dictionary(a.dictionary, warn=True)

    def real(texts: list[str]) -> float | None:  # the third reading, where there is a word list
        return None if dictionary is None else judge_ppl(judge, texts, "<unk>", dictionary)

    judge = DiffusionLM.from_pretrained(a.judge)
    items = blanked(ptb_lines("valid"), a.num, a.span)
    originals = [" ".join(p + g + s) for p, g, s in items]
    res = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads", "num": len(items), "span": a.span, "candidates": a.candidates,
           "original": {"ar_judge_ppl_word": judge_ppl(judge, originals),
                        "ar_judge_unk_ppl_word": judge_ppl(judge, originals, unknown_as="<unk>"),
                        "ar_judge_real_ppl_word": real(originals),
                        "smollm2_ppl_token": scorer.perplexity(originals)}, "rows": []}
    for name, path in runs.items():
        lm = DiffusionLM.from_pretrained(path)
        opts = {"order": a.block_order} if lm.process.family == "block" else None
        for c in (1, a.candidates):
            t0 = time.perf_counter()
            filled: list[str] = []
            for b in range(0, len(items), a.batch):
                jobs = []
                for i, (p, g, s) in enumerate(items[b : b + a.batch], start=b):
                    text, k = template(lm, p, g, s)
                    jobs.append(lm.prepare_infill(text, span_tokens=k, steps=a.steps, seed=i, candidates=c,
                                                  sampler_options=opts))
                filled += [" ".join(out[0].split()) for out in lm.run_jobs(jobs, bf16=False)]
            secs = (time.perf_counter() - t0) / len(items)
            row = {"model": name, "candidates": c, "sampler": f"{lm.preferred_sampler() or lm.process.default_sampler}"
                   f"{' ' + json.dumps(opts) if opts else ''}", "s_per_sentence": secs,
                   "recovered": sum(recovered(f, *it) for f, it in zip(filled, items)) / (a.span * len(items)),
                   "ar_judge_ppl_word": judge_ppl(judge, filled),
                   "ar_judge_unk_ppl_word": judge_ppl(judge, filled, unknown_as="<unk>"),
                   "ar_judge_real_ppl_word": real(filled),
                   "smollm2_ppl_token": scorer.perplexity(filled), "filled": filled,
                   "examples": filled[:3]}
            res["rows"].append(row)
            print(json.dumps({x: v for x, v in row.items() if x not in ("examples", "filled")}), flush=True)
        (a.out / f"infill-{'-'.join(runs)}.json").write_text(json.dumps(res, indent=2))
    o = res["original"]

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.0f}"

    print(f"\n{res['date']}, {res['machine']}; {len(items)} PTB validation sentences, {a.span} words blanked\n")
    print("| model | sampler | fills ranked | blanked words recovered | gen ppl / word (AR judge) "
          "| AR judge, unknown words as <unk> | AR judge, real words as <unk> | gen ppl / token (SmolLM2) "
          "| s / sentence |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| original sentences | | | 100% | {o['ar_judge_ppl_word']:.0f} | {o['ar_judge_unk_ppl_word']:.0f} "
          f"| {fmt(o['ar_judge_real_ppl_word'])} "
          f"| {o['smollm2_ppl_token']:.0f} | |")
    for r in res["rows"]:
        print(f"| {r['model']} | {r['sampler']} | {r['candidates']} | {100 * r['recovered']:.1f}% "
              f"| {r['ar_judge_ppl_word']:.0f} | {r['ar_judge_unk_ppl_word']:.0f} "
              f"| {fmt(r['ar_judge_real_ppl_word'])} | {r['smollm2_ppl_token']:.0f} "
              f"| {r['s_per_sentence']:.2f} |")


if __name__ == "__main__":
    main()
