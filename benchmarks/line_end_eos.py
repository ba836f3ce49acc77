"""What SmolLM2 as shipped pays for a line end, for each text that could be an adapted model's [EOS].

    python benchmarks/line_end_eos.py --corpus ptb
    python benchmarks/line_end_eos.py --corpus shakespeare

The first ``--lines`` lines of a corpus's validation text are joined with one candidate separator token and scored
by SmolLM2 in windows of 1,024 tokens; printed is the mean NLL (nats) of the separator at the line ends. The
candidates: its line break ``\\n`` (``tokenizer.eos_token: "\\n"``), ``<|im_end|>`` and ``<|endoftext|>``. An [EOS]
that difflm adds to the vocabulary starts at the mean embedding row, which the network has never predicted.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from difflm.data.corpora import ptb_lines
from difflm.evaluation.external import load_scorer

SEPARATORS = ("\n", "<|im_end|>", "<|endoftext|>")


def lines_of(corpus: str, n: int) -> list[str]:
    if corpus == "ptb":
        return ptb_lines("valid")[:n]
    text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt").read_text()
    return text[int(len(text) * 0.9) :].split("\n")[:n]  # the preset's validation tenth


@torch.no_grad()
def line_end_nll(scorer, lines: list[str], sep: str, window: int = 1024) -> float:
    """Mean NLL of ``sep`` at the end of each line, the lines joined by it (one token, or refused)."""
    tok = scorer.tokenizer
    sep_ids = tok(sep, add_special_tokens=False)["input_ids"]
    if len(sep_ids) != 1:
        raise SystemExit(f"{sep!r} is {len(sep_ids)} tokens for this tokenizer, not one")
    ids, ends = [scorer.sep], []
    for line in lines:
        ids += tok(line, add_special_tokens=False)["input_ids"] if line else []
        ends.append(len(ids))
        ids.append(sep_ids[0])
    total, n = 0.0, 0
    for a in range(0, len(ids) - 1, window):
        x = torch.tensor([ids[a : a + window + 1]])
        logp = torch.log_softmax(scorer.model(input_ids=x).logits[0, :-1].double(), -1)  # position i predicts i+1
        for e in ends:
            if a < e <= a + window and e - a - 1 < logp.shape[0]:
                total += float(-logp[e - a - 1, ids[e]])
                n += 1
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", choices=("ptb", "shakespeare"), default="ptb")
    ap.add_argument("--lines", type=int, default=400)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    scorer = load_scorer("smollm2")
    lines = lines_of(a.corpus, a.lines)
    print(f"| {a.corpus}: separator | NLL at a line end (nats) |\n|---|---:|")
    for sep in SEPARATORS:
        print(f"| `{sep!r}` | {line_end_nll(scorer, lines, sep):.2f} |")


if __name__ == "__main__":
    main()
