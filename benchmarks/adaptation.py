"""Starting from pretrained weights against training from scratch, at equal wall time on this machine.

    python benchmarks/adaptation.py --minutes 15
    python benchmarks/adaptation.py --minutes 15 --models ar,minilm-mdlm,minilm-scratch-mdlm \
        --train minilm-mdlm,minilm-scratch-mdlm

Trains, one after another and each for ``--minutes`` of wall time (``train.max_minutes``): the AR baseline
(``ptb-ar-small``, also the judge), the from-scratch presets (``ptb-mdlm-small``, ``ptb-bd3lm-small``) and the
AR→diffusion adaptations of SmolLM2-135M (``smollm2-135m-mdlm-ptb``, ``smollm2-135m-bd3lm-ptb``). Then, for each:

* validation NELBO per PTB **word** (the tokenizers differ: the bound in nats over the whole validation split,
  divided by its words, one per whitespace-separated word plus one per line for PTB's end of sentence); for a
  clean-causal adaptation also the exact NLL of its left-to-right decoder (``evaluate(left_to_right=True)``),
  the likelihood of the distribution its preset's sampler draws from;
* generative perplexity of ``--num`` samples of 128 tokens per *word* under the AR baseline (the texts are
  re-read with its word tokenizer), three times: a word outside PTB's vocabulary as the judge's [UNK] (a row never
  trained as a target, so each costs the judge's highest surprise); as the word <unk> (PTB's own convention:
  the corpus replaced every word outside its 10k vocabulary by <unk>; a word-level model writes <unk> for them);
  and as <unk> only where it is a real word (``--dictionary``, Debian's ``wamerican`` list, or a hyphenated
  compound of real words), a non-word ("dieteb") staying [UNK]. Only open-vocabulary models (SmolLM2's BPE,
  MiniLM's WordPiece) can write such words: the first reading charges a real word PTB lacks as noise, the second
  forgives a non-word, the third does neither. Then per *token* under SmolLM2 (biased in favour of its own
  descendants), with the held-out text under both judges for scale;
* unigram entropy of the samples' words, the share of them the judge lacks and of those the real words; the
  samples and an infill shown. ``--rejudge`` reads the samples a results file stores again, without the models.

Writes benchmarks/out/adaptation/results-<models>.json and prints Markdown for RESULTS.md. Run it alone (it times
things).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from difflm.data.corpora import ptb_lines
from difflm.evaluation.generative import ar_nll, special_ids
from difflm.pipeline import DiffusionLM

RUNS = {"ar": "ptb-ar-small", "mdlm": "ptb-mdlm-small", "bd3lm": "ptb-bd3lm-small",
        "smollm2-mdlm": "smollm2-135m-mdlm-ptb", "smollm2-bd3lm": "smollm2-135m-bd3lm-ptb",
        "smollm2-mdlm-cc": "smollm2-135m-mdlm-cc-ptb", "smollm2-bd3lm-cc": "smollm2-135m-bd3lm-cc-ptb",
        "smollm2-bd3lm-cc-bound-only": "smollm2-135m-bd3lm-cc-ptb", "smollm2-bd3lm-cc-b4": "smollm2-135m-bd3lm-cc-ptb",
        "smollm2-mdlm-cc-lr5e-5": "smollm2-135m-mdlm-cc-ptb",
        "minilm-mdlm": "minilm-mdlm-ptb", "minilm-scratch-mdlm": "minilm-mdlm-ptb",
        "minilm-shape-mdlm": "minilm-mdlm-ptb"}
#: runs that change their preset: the same MiniLM architecture and tokenizer from random weights, at the learning
#: rate difflm's from-scratch presets use
OVERRIDES = {"minilm-scratch-mdlm": ["model.init=null", "train.lr=1e-3", "name=minilm-scratch-mdlm-ptb"],
             # MiniLM's size and tokenizer, as difflm's own from-scratch transformer (pre-LN, rotary; the
             # ptb-*-small presets' dropout and learning rate): the from-scratch model a user would train instead
             "minilm-shape-mdlm": ["model.type=transformer", "model.init=null", "model.n_layer=6", "model.n_head=6",
                                   "model.d_model=384", "model.dropout=0.1", "train.lr=1e-3",
                                   "name=minilm-shape-scratch-mdlm-ptb"],
             "smollm2-mdlm-cc-lr5e-5": ["train.lr=5e-5"],
             "smollm2-bd3lm-cc-bound-only": ["process.clean_targets=false",
                                             "name=smollm2-135m-bd3lm-cc-bound-only-ptb"],
             "smollm2-bd3lm-cc-b4": ["train.batch_size=4", "name=smollm2-135m-bd3lm-cc-b4-ptb"]}
#: how a run that changes its preset is named in the table
LABELS = {"minilm-scratch-mdlm": " (random init, lr 1e-3)",
          "minilm-shape-mdlm": " (its size and tokenizer as difflm's transformer, random init, lr 1e-3)",
          "smollm2-mdlm-cc-lr5e-5": " at lr 5e-5",
          "smollm2-bd3lm-cc-bound-only": " without clean targets (BD3-LM's bound alone)",
          "smollm2-bd3lm-cc-b4": " at batch 4 (twice the steps, half the rows each)"}
INFILL = "the company said ___ in the third quarter ___ a year earlier"


def train(preset: str, out: Path, minutes: float, steps: int | None, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "difflm.cli", "train", preset, "--out", str(out), "--overwrite", "--no-progress",
           "--set", f"train.max_minutes={minutes}"]
    for o in overrides:
        cmd += ["--set", o]
    if steps:  # the cosine schedule ends about when the time does
        cmd += ["--set", f"train.max_steps={steps}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def last_row(run: Path) -> dict:
    rows = [r for r in (run / "metrics.csv").read_text().splitlines()[1:] if r]
    head = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    train_rows = [dict(zip(head, r.split(","))) for r in rows if r.split(",")[2]]
    return train_rows[-1]


def words(texts: list[str]) -> list[str]:
    return [w for t in texts for w in t.split()]


def word_entropy(texts: list[str]) -> float:
    c = Counter(words(texts))
    n = sum(c.values())
    return -sum(v / n * math.log(v / n) for v in c.values()) if n else float("nan")


def read_dictionary(path: Path | None, warn: bool = False) -> frozenset[str] | None:
    """The lowercased entries of a word list, one word a line (Debian's ``wamerican``: /usr/share/dict/words), or
    None where there is none (with ``warn``, saying on stderr that the third reading is left out)."""
    if path is None or not path.is_file():
        if warn:
            print(f"no word list at {path}: the 'real words as <unk>' reading is left out "
                  "(apt-get install wamerican, or --dictionary PATH)", file=sys.stderr)
        return None
    return frozenset(w.strip().lower() for w in path.read_text(encoding="utf-8", errors="ignore").splitlines())


def real_word(word: str, known: Callable[[str], int | None], dictionary: frozenset[str]) -> bool:
    """Whether ``word`` is English: in the judge's vocabulary or the dictionary, in any case ("Hospitals"), or a
    hyphenated compound ("third-quarter") whose every part is. A lone "-" or "." is not a word."""
    parts = word.lower().split("-") if "-" in word.strip("-") else [word.lower()]
    return all(p != "" and (known(p) is not None or p in dictionary) for p in parts)


def judge_reading(text: str, known: Callable[[str], int | None], unknown_as: str,
                  dictionary: frozenset[str] | None = None) -> str:
    """``text`` with every word the judge lacks (``known(w) is None``) written as ``unknown_as``; with a
    ``dictionary``, only the real ones (``real_word``). Lines and the words the judge has are kept."""
    def read(w: str) -> str:
        lacking = known(w) is None
        return unknown_as if lacking and (dictionary is None or real_word(w, known, dictionary)) else w
    return "\n".join(" ".join(read(w) for w in line.split()) for line in text.split("\n"))


def judge_ppl(ar: DiffusionLM, texts: list[str], unknown_as: str | None = None,
              dictionary: frozenset[str] | None = None) -> float:
    """Per-word perplexity of texts under the word-level AR baseline (each text is one sequence). A word outside
    the judge's vocabulary is its [UNK], a row never trained as a target; ``unknown_as`` ("<unk>") reads it as that
    word instead, as PTB itself does: the corpus replaced every word outside its 10k vocabulary by <unk>. With a
    ``dictionary`` only real words (``real_word``) read as ``unknown_as``; a non-word ("dieteb") stays [UNK]."""
    L = ar.seq_len
    known = ar.tokenizer.hf.token_to_id
    rows = []
    for t in texts:
        if unknown_as:
            t = judge_reading(t, known, unknown_as, dictionary)
        ids = ar.encode_text(t)[: L - 1] + [ar.tokenizer.eos_id]
        rows.append(ids + [ar.tokenizer.pad_id] * (L - len(ids)))
    nll, n = ar_nll(ar, torch.tensor(rows), special_ids(ar.tokenizer) - {ar.tokenizer.eos_id})
    return math.exp(nll / max(n, 1))


def judge_oov(ar: DiffusionLM, texts: list[str]) -> float:
    """The fraction of the texts' words that the word-level judge has no row for (its [UNK], never trained on: each
    costs the judge's highest surprise), e.g. a WordPiece model's "said." or "< unk >"."""
    ids = [i for t in texts for i in ar.encode_text(t) if i != ar.tokenizer.eos_id]
    return sum(i == ar.tokenizer.special["unk"] for i in ids) / max(len(ids), 1)


def real_share(ar: DiffusionLM, texts: list[str], dictionary: frozenset[str]) -> float:
    """Of the texts' words the judge lacks, the fraction that are real words (``real_word``)."""
    known = ar.tokenizer.hf.token_to_id
    lacking = [w for w in words(texts) if known(w) is None]
    return sum(real_word(w, known, dictionary) for w in lacking) / max(len(lacking), 1)


def judge_readings(ar: DiffusionLM, texts: list[str], dictionary: frozenset[str] | None) -> dict[str, float]:
    """The AR judge's figures of a row: perplexity per word under each reading (the third where there is a word
    list), the share of words it lacks and of those the real ones."""
    out = {"ar_judge_ppl_word": judge_ppl(ar, texts), "ar_judge_unk_ppl_word": judge_ppl(ar, texts, unknown_as="<unk>"),
           "judge_oov": judge_oov(ar, texts)}
    if dictionary is not None:
        out["ar_judge_real_ppl_word"] = judge_ppl(ar, texts, "<unk>", dictionary)
        out["judge_oov_real"] = real_share(ar, texts, dictionary)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--models", default="ar,mdlm,bd3lm,smollm2-mdlm,smollm2-bd3lm",
                    help=f"rows of the table, from {', '.join(RUNS)} (ar is the judge and always read)")
    ap.add_argument("--train", default=None, help="which of --models to train (default: all; 'none': reuse)")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="the samples' seed (a second draw of the same models)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/adaptation"))
    ap.add_argument("--eval-batches", type=int, default=None, help="cap the validation batches (smoke runs)")
    ap.add_argument("--skip-train", action="store_true", help="reuse the runs in --out")
    ap.add_argument("--train-only", action="store_true", help="stop after training: evaluate later with "
                    "--skip-train, alone and on every core, when runs trained at once")
    ap.add_argument("--samples-only", action="store_true", help="draw and judge samples only (no bound, no "
                    "decoder likelihoods): a second seed, or judging again")
    ap.add_argument("--no-bound", action="store_true", help="skip the bound (already measured): likelihoods of "
                    "decoders and samples only")
    ap.add_argument("--block-orders", default="random",
                    help="block rows: sample with each of these block sampler orders (random, left-to-right, "
                    "confidence), one table row each")
    ap.add_argument("--adapted-step-s", type=float, default=2.6,
                    help="seconds per SmolLM2 step here, to end its cosine schedule with the time")
    ap.add_argument("--decay-over-time", action="store_true",
                    help="every trained row decays its learning rate over --minutes of training time "
                    "(train.decay_minutes), so no step-time guess cuts a schedule short; --adapted-step-s then "
                    "sizes only the SmolLM2 warm-up and annealing")
    ap.add_argument("--dictionary", type=Path, default=Path("/usr/share/dict/words"),
                    help="an English word list for the third reading of the AR judge (apt-get install wamerican)")
    ap.add_argument("--rejudge", action="store_true", help="judge the samples stored in --out's results JSON "
                    "again (no model is loaded or drawn from): a new reading of stored samples")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every trained row (after the row's own), e.g. train.warmup_steps=20")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    keys = a.models.split(",")
    to_train = keys if a.train is None else ([] if a.train == "none" else a.train.split(","))
    a.out.mkdir(parents=True, exist_ok=True)
    wall = {}
    for k in keys:
        if k in to_train and not a.skip_train:
            # block diffusion's training pass reads [x_t, x0]: twice the tokens per step
            step_s = a.adapted_step_s * (2 if "bd3lm" in k else 1)
            steps = int(a.minutes * 60 / step_s) if k.startswith("smollm2") else None
            extra = list(OVERRIDES.get(k, []))
            if steps and "-cc" in k:  # clean-causal: no annealing; warm up over a tenth of the budget
                extra.append(f"train.warmup_steps={max(2, min(50, steps // 10))}")
            elif steps:  # attention opens over the first quarter of the budget (the preset's 200 steps need ~9 min)
                extra.append(f"model.anneal_steps={max(10, min(200, steps // 4))}")
            if a.decay_over_time:  # the time ends the schedule; the step count only has to be out of reach
                extra.append(f"train.decay_minutes={a.minutes}")
                steps = 10**6
            wall[k] = train(RUNS[k], a.out / k, a.minutes, steps, extra + a.set)
            print(f"trained {k} in {wall[k]:.0f} s", flush=True)
    if a.train_only:
        return
    dictionary = read_dictionary(a.dictionary, warn=True)
    if a.rejudge:
        return rejudge(a.out / f"results-{'-'.join(keys)}.json", a.out / "ar", dictionary)

    from difflm.evaluation.external import load_scorer

    scorer = load_scorer("smollm2")
    ar = DiffusionLM.from_pretrained(a.out / "ar")
    valid = ptb_lines("valid")
    n_words = sum(len(line.split()) + 1 for line in valid)
    ref = [" ".join(line.split()[:100]) for line in valid[: a.num * 4]]
    ref = [" ".join(ref[i : i + 4]) for i in range(0, len(ref), 4)]
    results = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads", "minutes": None if a.skip_train else a.minutes,
               "heldout": {"ar_judge_ppl_word": judge_ppl(ar, ref), "smollm2_ppl_token": scorer.perplexity(ref),
                           "word_entropy": word_entropy(ref), "judge_oov": judge_oov(ar, ref)}, "rows": []}
    for k in keys:
        lm = DiffusionLM.from_pretrained(a.out / k)
        last = last_row(a.out / k)
        row = {"model": k, "preset": RUNS[k] + LABELS.get(k, ""),
               **{f"train_{x}": last[x] for x in ("step", "tokens", "elapsed_s", "tokens_per_s")}}
        if not (a.no_bound or a.samples_only):
            t0 = time.perf_counter()
            ev = lm.evaluate("valid", samples=1, batch_size=16, max_batches=a.eval_batches)
            row["eval_s"] = time.perf_counter() - t0
            row["nelbo_token"], row["valid_tokens"] = ev.nelbo, ev.n_tokens
            row["nelbo_word"] = ev.nelbo * ev.n_tokens / n_words  # = total nats / words, over the whole split
        if getattr(lm.process.options, "clean_causal", False) and not a.samples_only:  # left-to-right exact NLL
            ev = lm.evaluate("valid", batch_size=16, max_batches=a.eval_batches, left_to_right=True)
            row["nll_l2r_word"] = ev.nelbo * ev.n_tokens / n_words
        if lm.process.family == "masked":
            row["infill"] = lm.infill(INFILL, span_tokens=6, seed=0, num=2)
        options = lm.run.sample.options or {}
        for order in a.block_orders.split(",") if lm.process.family == "block" else [None]:
            opts = options if order in (None, "random") else {**options, "order": order}
            t0 = time.perf_counter()
            g = lm.generate(a.num, 128, steps=a.steps, seed=a.seed, batch_size=a.num, sampler_options=opts)
            row = {**row, "sample_s": (time.perf_counter() - t0) / a.num, "nfe": float(g.nfe.float().mean()),
                   "sampler": f"{lm.run.sample.sampler or lm.process.default_sampler} {opts or ''}".strip()}
            texts = [t.strip() for t in g.texts]
            row.update(judge_readings(ar, texts, dictionary))
            row["smollm2_ppl_token"] = scorer.perplexity(texts)
            row["word_entropy"] = word_entropy(texts)
            row["samples"], row["texts"] = texts[:3], texts  # all of them: to judge again later
            results["rows"].append(row)
            print(json.dumps({x: v for x, v in row.items() if x not in ("samples", "texts")}), flush=True)
            (a.out / f"results-{'-'.join(keys)}.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def rejudge(path: Path, judge: Path, dictionary: frozenset[str] | None) -> None:
    """Read the samples stored in a results JSON (``texts`` of every row) with the AR judge again, every reading,
    and write the file back with the new figures (the models and SmolLM2 are not loaded)."""
    if not path.is_file():
        print(f"no results at {path}: run without --rejudge first, with the same --models and --out", file=sys.stderr)
        sys.exit(2)
    results = json.loads(path.read_text())
    ar = DiffusionLM.from_pretrained(judge)
    for row in results["rows"]:
        row.update(judge_readings(ar, row["texts"], dictionary))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    print_table(results)


def print_table(results: dict) -> None:
    """The Markdown table of a results dict (RESULTS.md). The third AR-judge reading appears when it was made."""
    real = any("ar_judge_real_ppl_word" in r for r in results["rows"])
    h = results["heldout"]
    print(f"\n{results['date']}, {results['machine']}\n")
    print("| model | train min | steps | train tokens | valid NELBO / word (nats) | left-to-right NLL / word | sampler "
          "| gen ppl / word (AR judge) | AR judge, unknown words as <unk> "
          + ("| AR judge, real words as <unk> " if real else "")
          + "| gen ppl / token (SmolLM2) | word entropy | words the judge lacks "
          + ("| of which real words " if real else "") + "|")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if real else "") + "---:|---:|---:|"
          + ("---:|" if real else ""))
    print(f"| held-out text | | | | | | | {h['ar_judge_ppl_word']:.0f} | | " + ("| " if real else "")
          + f"{h['smollm2_ppl_token']:.0f} | {h['word_entropy']:.2f} | {h['judge_oov']:.1%} |" + (" |" if real else ""))
    for r in results["rows"]:
        l2r = f"{r['nll_l2r_word']:.3f}" if "nll_l2r_word" in r else ""
        bound = f"{r['nelbo_word']:.3f}" if "nelbo_word" in r else ""
        third = f"| {r['ar_judge_real_ppl_word']:.0f} " if "ar_judge_real_ppl_word" in r else ("| " if real else "")
        share = f" {r['judge_oov_real']:.0%} |" if "judge_oov_real" in r else (" |" if real else "")
        print(f"| {r['preset']} | {float(r['train_elapsed_s']) / 60:.0f} | {r['train_step']} "
              f"| {int(r['train_tokens']):,} | {bound} | {l2r} "
              f"| {r['sampler']} | {r['ar_judge_ppl_word']:.0f} | {r['ar_judge_unk_ppl_word']:.0f} {third}"
              f"| {r['smollm2_ppl_token']:.0f} | {r['word_entropy']:.2f} | {r['judge_oov']:.1%} |{share}")


if __name__ == "__main__":
    main()
