"""Spanish -> English translation (../shared/data/spa2web) with encoder-decoder models trained for the same wall
time: the AR baseline and the masked diffusion model share the shape, encoder included (presets spa2web-ar and
spa2web-mdlm), next to copying the source.

    python benchmarks/spa2web.py --minutes 60 [--test 1141] [--models ar,mdlm,mdlm-kd,mdlm-abs,mdlm-abs-kd,...]

Two models can train at once on one core each (equal CPU for both): `--threads 1 --train-only` in two processes,
then one `--reuse` run alone scores them.

Per model: BLEU and chrF (sacrebleu), ROUGE-L, NFE and seconds per sentence on the first --test test verses; and
source use, the model's bound on 64 validation targets (nats per target token) with the source and with it
replaced by [PAD]. AR decodes greedily and by beam search (4); the masked model with Mask-Predict (10 iterations),
with the ancestral sampler (32 steps) and from the AR model's greedy draft (AR bootstrap: Mask-Predict from
iteration 5 of 10; its seconds include the AR draft's); the masked model that predicts its target length
(data.target_length predicted) with Mask-Predict over its 3 most probable lengths, and from the AR draft; mdlm-abs,
the masked model with sinusoidal absolute positions (model.absolute_positions); mdlm-kd and mdlm-abs-kd, mdlm and
mdlm-abs trained on distilled targets (the AR model's greedy translations of the training sources, written once by
`difflm distill-data` to <out>/kd-data; valid and test keep the real references); mdlm-cmlm and mdlm-glat, the
masked model on Mask-Predict's loss with random masks or with glancing ones (process.loss cmlm, glat; glat-mix: half
the rows masked at random, process.glance_mix 0.5); mdlm-cmlm-copy, cmlm with the source's embeddings copied into
the decoder input (model.copy_source, Gu et al. 2018's uniform copy); mdlm-adapt,
the AR model as it stood at --adapt-at minutes (<out>/ar-at-M, copied when its training passes that mark) adapted to
the masked family for the rest of the --minutes (model.init, model.shift, Mask-Predict's loss: AR→diffusion
adaptation at equal wall time, AR minutes included), and mdlm-adapt-anneal the same with attention annealed
from causal over 200 steps (model.anneal_steps; -anneal50 over 50, and -anneal50-blocks with the masks laid out as
semi-AR decoding meets the row, process.mask_layout blocks); the adapted models also decode
semi-autoregressively (blocks of 8 from the target's start, argmax tokens, every token above 0.9 in a call and at
least one); block,
BD3-LM (blocks of 8) with its block sampler (ancestral, and Fast-dLLM v2's threshold decoding), and block-adapt the
AR model adapted to it (attention opened to block-causal over 50 steps); uniform, d3pm, sedd and gaussian from
scratch with their own samplers; edit, DiffusER (from the empty sequence, and from the AR model's draft);
ar-continue, the adaptations' control: the AR model restarted from the same copy with a fresh optimizer.
--decay: each run's learning rate decays (cosine) over its own minutes instead of staying at the peak; --set
KEY=VALUE overrides the config of every model trained (e.g. train.warmup_steps=20 for a short adaptation).
--seed S trains another seed into <model>-seedS; --test-skip N scores the test verses from N on (a second set);
--rows keeps only some decoders; --semi-ar B:τ,... scores the adapted models with semi-AR decoding (dual cache) in
blocks of B at threshold τ instead.
--data kjv2web: the same models on King James -> World English Bible, next to copying the source (the masked models
also refine the source itself: Mask-Predict from iteration 5 of 10 with the source as the draft).
Goal (issue 24): the best diffusion model within 10% of the AR model's BLEU and its source use within 20% of AR's.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import sacrebleu
import torch

from difflm.config import load_config
from difflm.data import build_dataset
from difflm.data.corpora import load_pairs
from difflm.data.datasets import drop_condition, source_mask
from difflm.evaluation.text_metrics import rouge_l
from difflm.models.seq2seq import bind_source
from difflm.pipeline import DiffusionLM
from difflm.runfolder import copy_model_folder
from difflm.training.trainer import Trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # spa2web/, kjv2web/: the same layout
AR = {"sampler": "autoregressive"}
BOOT = {"sampler": "mask-predict", "steps": 10, "draft_from": "ar"}  # AR bootstrap: from the AR model's greedy draft
# kjv2web: the target keeps most of its source, so a masked model also refines the source itself
SOURCE_DRAFT = ("the source as draft, mask-predict from 5 of 10",
                {"sampler": "mask-predict", "steps": 10, "draft_from": "source"})
MASKED = [("mask-predict T=10", {"sampler": "mask-predict", "steps": 10}),
          ("ancestral 32", {"sampler": "ancestral", "steps": 32}),
          ("AR draft, mask-predict from 5 of 10", BOOT)]
# an adapted model's AR parent read its left context: semi-autoregressive decoding keeps it in that regime (blocks of
# 8 from the target's start, LLaDA; every token above 0.9 in a call and at least one, Fast-dLLM), argmax tokens as in
# Mask-Predict. Without a cache it is slow: the curve's marks score only the row with the dual cache below
SEMI_AR = ("semi-AR, blocks of 8, threshold 0.9", {"sampler": "threshold",
                                                    "sampler_options": {"block": 8, "greedy": True}})
# the same, each row ended once its text is settled (an [EOS] with nothing masked before it: the same text), and
# with Fast-dLLM's approximate KV cache on top (§3.2: keys outside the block stored when a row enters it)
SEMI_AR_FAST = [(f"{SEMI_AR[0]}, stop at [EOS]{f', {c} cache' if c else ''}",
                 {**SEMI_AR[1], "sampler_options": {**SEMI_AR[1]["sampler_options"], "stop_at_eos": True,
                                                    **({"kv_cache": c} if c else {})}})
                for c in ("", "prefix", "dual")]
ADAPTED = [MASKED[0], SEMI_AR, *SEMI_AR_FAST, MASKED[2]]
# clean-causal attention refuses Fast-dLLM's approximate caches: the same decoders without them, and blocks of 1 (one
# token a call, left to right: the decoding in which the first [MASK] after the clean prefix is always the one
# predicted); both also with the exact cache of this attention (kv_cache causal: the same text, fewer positions a call)
ONE = ("semi-AR, blocks of 1, stop at [EOS]", {"sampler": "threshold", "sampler_options": {
    "block": 1, "greedy": True, "stop_at_eos": True}})
# ... and self-speculative decoding (blockwise parallel decoding, Stern et al. 2018): the [MASK]s after the prefix
# propose K tokens at once, the next call's exact next-token predictions keep those they agree with (the text of
# blocks of 1, in fewer calls)
SPECULATIVE = [(f"speculative, draft {k}, stop at [EOS], causal cache",
                {"sampler": "speculative", "sampler_options": {"draft": k, "stop_at_eos": True, "kv_cache": "causal"}})
               for k in (2, 4, 8)]
# ... and beam search over the same next-token predictions (AR's beam 4, on the adapted model)
BEAM = ("beam 4 over the next-token predictions, causal cache", {"sampler": "beam", "sampler_options": {
    "beam": 4, "kv_cache": "causal"}})
ADAPTED_CC = [MASKED[0], SEMI_AR_FAST[0], MASKED[2], ONE,
              *((f"{label}, causal cache", {**kw, "sampler_options": {**kw["sampler_options"], "kv_cache": "causal"}})
                for label, kw in (SEMI_AR_FAST[0], ONE)), *SPECULATIVE, BEAM]
# BD3-LM's sampler: ancestral steps inside each block of 8 (4 each), or Fast-dLLM v2's parallel decoding (argmax
# tokens, every one above 0.9 in a call and at least one), both with the earlier blocks in the exact KV cache
BLOCK = [("block sampler, 64 steps", {"sampler": "block", "steps": 64, "sampler_options": {"stop_at_eos": True}}),
         ("block sampler, threshold 0.9", {"sampler": "block", "steps": 128,
                                           "sampler_options": {"threshold": 0.9, "stop_at_eos": True}})]
PLAIN = ("spa2web-mdlm", [], MASKED)  # mdlm and mdlm-kd: the same model and decoders, real or distilled targets
ABS = ("spa2web-mdlm", ["model.absolute_positions=true"], MASKED)  # mdlm-abs and mdlm-abs-kd
AR_ROWS = [("greedy", {**AR, "sampler_options": {"greedy": True}}), ("beam 4", {**AR, "sampler_options": {"beam": 4}})]
MODELS = {  # name: (preset, overrides, [(label, generate_targets keywords)])
    "ar": ("spa2web-ar", [], AR_ROWS),
    # the control for an adaptation: the AR model restarted from its copy at --adapt-at with a fresh optimizer and
    # the same schedule as the adapted models, its objective unchanged
    "ar-continue": ("spa2web-ar", [], AR_ROWS),
    "mdlm": PLAIN,
    # the same on the AR teacher's greedy translations of the training sources (sequence-level distillation,
    # Kim & Rush 2016): `difflm distill-data <out>/ar`, written once to <out>/kd-data (valid and test stay real)
    "mdlm-kd": PLAIN,
    # Mask-Predict's loss (each row's mean cross-entropy over its masked tokens), on random or on glancing masks
    # (GLAT, Qian et al. 2021: a first pass over the all-[MASK] target decides how much of it to reveal)
    "mdlm-cmlm": ("spa2web-mdlm", ["process.loss=cmlm"], MASKED),
    "mdlm-glat": ("spa2web-mdlm", ["process.loss=glat"], MASKED),
    # ... with half the rows masked at a random rate (glancing alone never trains on the all-[MASK] row)
    "mdlm-glat-mix": ("spa2web-mdlm", ["process.loss=glat", "process.glance_mix=0.5"], MASKED),
    # Mask-Predict's loss with the source's embeddings copied into the decoder input (Gu et al. 2018's uniform copy,
    # source and target about as long in tokens: ratio 1), so an all-[MASK] target holds the source's words in order
    "mdlm-cmlm-copy": ("spa2web-mdlm", ["process.loss=cmlm", "model.copy_source=true"], MASKED),
    # AR→diffusion adaptation (Dream, DiffuLLaMA) of the encoder-decoder: the AR model at --adapt-at minutes, its
    # next-token decoder kept as it is (model.shift), trained on as a masked model for the remaining minutes
    "mdlm-adapt": ("spa2web-mdlm", ["process.loss=cmlm", "model.shift=true"], ADAPTED),
    # the same with the decoder's attention opened from causal over the first 200 steps (DiffuLLaMA's annealing)
    "mdlm-adapt-anneal": ("spa2web-mdlm", ["process.loss=cmlm", "model.shift=true", "model.anneal_steps=200"],
                          ADAPTED),
    # a short adaptation (5 to 10 minutes, 90 to 180 one-thread steps) opens the attention over its first 50 steps
    "mdlm-adapt-anneal50": ("spa2web-mdlm", ["process.loss=cmlm", "model.shift=true", "model.anneal_steps=50"],
                            ADAPTED),
    # the same, its masks laid out as semi-AR decoding meets the row (a clean prefix, one block of 8 masked at the
    # drawn rate, everything after it masked; the loss on the block): the adaptation trains what decoding asks of it
    "mdlm-adapt-anneal50-blocks": ("spa2web-mdlm", ["process.loss=cmlm", "model.shift=true", "model.anneal_steps=50",
                                                    "process.mask_layout=blocks", "process.mask_block=8"], ADAPTED),
    # clean-causal attention (process.attention): clean positions read only the clean positions up to them, as in
    # the AR parent, and each [MASK] those and itself, so a clean prefix keeps the parent's reading of it and the first
    # [MASK] after it is the parent's next token; random masks, or the blocks layout of semi-AR decoding
    "mdlm-adapt-cc": ("spa2web-mdlm", ["process.loss=cmlm", "model.shift=true", "process.attention=clean-causal"],
                      ADAPTED_CC),
    "mdlm-adapt-blocks-cc": ("spa2web-mdlm", ["process.loss=cmlm", "model.shift=true",
                                              "process.attention=clean-causal", "process.mask_layout=blocks",
                                              "process.mask_block=8"], ADAPTED_CC),
    # ... scoring the clean positions up to the block too (process.clean_targets: a shifted prediction never reads
    # its own position, so each is scored as if masked; the clean prefix by the parent's own AR loss)
    "mdlm-adapt-blocks-cc-ct": ("spa2web-mdlm", ["process.loss=cmlm", "model.shift=true",
                                                 "process.attention=clean-causal", "process.mask_layout=blocks",
                                                 "process.mask_block=8", "process.clean_targets=true"], ADAPTED_CC),
    # ... adapted on the AR teacher's greedy translations (the -kd data above): the parent learns to write its own
    # greedy output, which the blocks' parallel predictions of later tokens find easier to agree with
    "mdlm-adapt-blocks-cc-ct-kd": ("spa2web-mdlm", ["process.loss=cmlm", "model.shift=true",
                                                    "process.attention=clean-causal", "process.mask_layout=blocks",
                                                    "process.mask_block=8", "process.clean_targets=true"], ADAPTED_CC),
    "mdlm-len": ("spa2web-mdlm", ["data.target_length=predicted"],
                 [("length beam 3, mask-predict T=10", {"sampler": "mask-predict", "steps": 10, "length_beam": 3}),
                  ("AR draft, mask-predict from 5 of 10", BOOT)]),
    # sinusoidal absolute positions on top of rotary: a mostly-[MASK] row otherwise says little about where a query is
    "mdlm-abs": ABS,
    "mdlm-abs-kd": ABS,  # the same on distilled targets
    # BD3-LM over the target: blocks of 8 tokens, 4 steps each (the block sampler's budget is over the whole row)
    "block": ("spa2web-mdlm", ["process={type: block, block_size: 8}"], BLOCK),
    # the AR model adapted to BD3-LM (Fast-dLLM v2, SDAR): next-token decoder kept, attention opened from causal to
    # block-causal over the first 50 steps, BD3-LM's loss; its earlier blocks are exact in the KV cache
    "block-adapt": ("spa2web-mdlm", ["process={type: block, block_size: 8}", "model.shift=true",
                                     "model.anneal_steps=50"], BLOCK),
    # the other families, from scratch, each with its own sampler
    "uniform": ("spa2web-mdlm", ["process={type: uniform}"], [("ancestral 32", {"sampler": "ancestral", "steps": 32})]),
    "d3pm": ("spa2web-mdlm", ["process={type: d3pm}"], [("ancestral 32", {"sampler": "ancestral", "steps": 32})]),
    "sedd": ("spa2web-mdlm", ["process={type: sedd}"], [("Euler 32", {"sampler": "euler", "steps": 32})]),
    "gaussian": ("spa2web-mdlm", ["process={type: gaussian, schedule: sqrt, embed_dim: 64, self_conditioning: true}"],
                 [("DPM-Solver 20", {"sampler": "dpm-solver", "steps": 20})]),
    # DiffusER: tagger and generator over the target, the source read by cross-attention; from the empty sequence
    # and from the AR model's greedy draft (DiffusER's AR bootstrap)
    "edit": ("spa2web-mdlm", ["process={type: edit}"],
             [("DiffusER 10 steps, greedy", {"sampler": "diffuser", "steps": 10, "sampler_options": {"greedy": True}}),
              ("DiffusER from the AR draft, greedy", {"sampler": "diffuser", "steps": 10, "draft_from": "ar",
                                                      "sampler_options": {"greedy": True}})]),
}


def source_use(lm: DiffusionLM, rows: int = 64) -> tuple[float, float]:
    """Nats per target token (the target's own tokens, up to its first [EOS]) with and without the source."""
    tok = lm.tokenizer
    b = build_dataset(lm.run.data, tok, "valid").batch(list(range(rows)))
    fill = b.loss_mask & (b.tokens == tok.eos_id)
    words = b.loss_mask & ~(fill & (fill.cumsum(-1) > 1)) & ~source_mask(b.tokens, tok.bos_id)
    out = []
    for batch in (b, drop_condition(b, torch.ones(len(b.tokens), dtype=torch.bool), tok.pad_id, tok.bos_id)):
        draws = 1 if lm.process.family == "autoregressive" else 8
        g = torch.Generator().manual_seed(0)
        tot = torch.zeros(b.tokens.shape, dtype=torch.float64)
        for _ in range(draws):
            with torch.no_grad():
                tot += lm.process.bound_terms(bind_source(lm.model, lm.process, batch.tokens), batch, g).double()
        out.append(float(tot[words].sum() / draws / words.sum()))
    return out[0], out[1]


def seeded(name: str, seed: int) -> str:
    """A run folder's name: ``name``, or ``name-seedS`` for a training seed S other than 0."""
    return f"{name}-seed{seed}" if seed else name


def distilled_data(out: Path, data: Path, seed: int = 0, every: int = 1) -> Path:
    """<out>/kd-data (kd-data-seedS for the AR run <out>/ar-seedS): train.jsonl with the AR teacher's greedy
    translations as targets of every ``every``-th training pair (the 1st, the every+1-th, ...; a short adaptation
    reads few pairs), written once by `difflm distill-data`; valid.jsonl and test.jsonl link to the real ones."""
    kd, teacher = out / seeded("kd-data", seed), seeded("ar", seed)
    if (kd / "train.jsonl").is_file():
        made = int((kd / "every.txt").read_text()) if (kd / "every.txt").is_file() else 1
        if made != every:
            raise SystemExit(f"spa2web: {kd} holds every {made}th pair distilled, not every {every}th: give "
                             f"--distill-every {made} or remove the folder")
    else:
        if not (out / teacher / "model.safetensors").is_file():
            raise SystemExit(f"spa2web: the -kd models need the AR teacher {out / teacher}: train --models ar first")
        kd.mkdir(parents=True, exist_ok=True)
        pairs = data / "train.jsonl"
        if every > 1:
            lines = pairs.read_text().splitlines(keepends=True)[::every]
            pairs = kd / f"train-every{every}.jsonl"
            pairs.write_text("".join(lines))
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("difflm")), "distill-data", str(out / teacher),
                        str(pairs), str(kd / "train.jsonl"), "--truncate"], check=True)
        (kd / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        (kd / "every.txt").write_text(f"{every}\n")
    for split in ("valid", "test"):
        if not (kd / f"{split}.jsonl").exists():
            (kd / f"{split}.jsonl").symlink_to((data / f"{split}.jsonl").resolve())
    return kd


def trained_minutes(run_dir: Path) -> float:
    """Training minutes a run folder holds (its log's last elapsed_s), 0 when there is none."""
    log = run_dir / "metrics.csv"
    if not (run_dir / "model.safetensors").is_file() or not log.is_file():
        return 0.0
    rows = list(csv.DictReader(log.open()))
    return float(rows[-1]["elapsed_s"]) / 60 if rows else 0.0


def slow_rows(decoders: list) -> tuple:
    """The decoders of ``decoders`` whose text another, faster one of them writes too: the semi-AR rows without
    the dual cache (or, for a clean-causal model, without its exact causal cache)."""
    if SEMI_AR_FAST[2] in decoders:
        return (SEMI_AR, *SEMI_AR_FAST[:2])
    return (SEMI_AR, SEMI_AR_FAST[0], ONE) if ADAPTED_CC[-1] in decoders else (SEMI_AR,)


def curve_point(run_dir: Path, decoders: list, valid: list[tuple[str, str]], before: float = 0.0) -> None:
    """BLEU on the valid verses with each of the model's own decoders (not the AR-bootstrap rows), recorded in
    run_dir/curve.json under the minutes trained (plus ``before``: an adapted model's AR minutes)."""
    lm = DiffusionLM.from_pretrained(run_dir, device="cpu")
    minutes = round(trained_minutes(run_dir) + before, 1)
    point = {"step": json.loads((run_dir / "manifest.json").read_text())["step"]}
    slow = slow_rows(decoders)
    for label, kw in decoders:
        if "draft_from" not in kw and (label, kw) not in slow:
            outs = lm.generate_targets([s for s, _ in valid], batch_size=32, truncate=True, **kw)
            point[label] = sacrebleu.corpus_bleu([o.prediction for o in outs], [[t for _, t in valid]]).score
    path = run_dir / "curve.json"
    curve = json.loads(path.read_text()) if path.is_file() else {}
    curve[str(minutes)] = point
    path.write_text(json.dumps(curve, indent=1))
    print(json.dumps({"run": str(run_dir), "minutes": minutes, **point}), flush=True)


def plot_curves(runs: dict[str, Path], png: Path) -> None:
    """BLEU on valid against training minutes, one line per model and decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in runs.items():
        path = d / "curve.json"
        if not path.is_file():
            continue
        curve = sorted((float(m), p) for m, p in json.loads(path.read_text()).items())
        for label in [k for k in curve[-1][1] if k != "step"]:
            pts = [(m, p[label]) for m, p in curve if label in p]
            ax.plot([m for m, _ in pts], [b for _, b in pts], marker="o", label=f"{name} ({label})")
    ax.set_xlabel("training minutes (wall time)")
    ax.set_ylabel("BLEU on spa2web valid")
    ax.set_title(f"spa2web: BLEU against training time ({date.today()})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def scores(preds: list[str], refs: list[str]) -> dict:
    return {"bleu": sacrebleu.corpus_bleu(preds, [refs]).score, "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
            "rouge_l": rouge_l(preds, refs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--data", default="spa2web", choices=["spa2web", "kjv2web"],
                    help="the pairs under ../shared/data (kjv2web: the same models on King James -> WEB, where "
                         "the masked models also refine the source itself)")
    ap.add_argument("--test", type=int, default=1141)
    ap.add_argument("--test-skip", type=int, default=0, help="score test verses from this one on (a second set: "
                                                             "--test-skip 500 after --test 500)")
    ap.add_argument("--seed", type=int, default=0, help="the training seed (not 0: run folders <model>-seedS)")
    ap.add_argument("--distill-every", type=int, default=1, metavar="N",
                    help="the -kd models: distil every N-th training pair (a short adaptation reads few of them)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/spa2web"))
    ap.add_argument("--reuse", action="store_true", help="score the runs already in --out instead of training them "
                                                         "again (train the missing ones, resume the shorter ones)")
    ap.add_argument("--curve", default="", help="minute marks (e.g. 15,30,45) at which training pauses for BLEU on "
                                                "valid (the learning curve); --minutes is always one")
    ap.add_argument("--valid", type=int, default=200, help="valid verses the curve is scored on")
    ap.add_argument("--png", type=Path, default=None, help="the learning-curve figure (default <out>/curve.png)")
    ap.add_argument("--adapt-at", default="", help="minute marks (e.g. 30,45) at which the AR run copies itself "
                                                   "(<out>/ar-at-M); an mdlm-adapt model starts from the one it is "
                                                   "given (<out>/<model>-from-M)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--train-only", action="store_true", help="train (and score the curve marks), skip the test")
    ap.add_argument("--no-slow", action="store_true", help="skip the semi-AR rows without the dual cache that give "
                                                           "no other text (plain: as stopping at [EOS]) or only "
                                                           "speed (the prefix cache); for a clean-causal model the "
                                                           "rows without its causal cache (the same text)")
    ap.add_argument("--rows", default="", help="score only the decoders whose label holds one of these "
                                               "comma-separated strings (e.g. 'greedy,beam,dual cache');"
                                               " a comma and a space belong to the string ('semi-AR, blocks of 4')")
    ap.add_argument("--semi-ar", default="", help="block:threshold pairs (e.g. 4:0.9,8:0.7): score the adapted "
                                                  "models with semi-AR decoding (stop at [EOS], dual cache) at each "
                                                  "pair instead of their usual decoders")
    ap.add_argument("--score-copies", action="store_true", help="with --models ar and --adapt-at: score the AR "
                    "run's copies at those marks too (what each adaptation starts from)")
    ap.add_argument("--results", default="results.json", help="the file under --out the scores go to")
    ap.add_argument("--decay", action="store_true",
                    help="each run's learning rate decays over its own minutes (train.decay_minutes: AR over "
                         "--minutes, an adapted model over the minutes after its AR copy's) instead of staying at "
                         "the peak")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every model trained (repeatable), e.g. train.warmup_steps=20; "
                         "give such runs their own --out (an adapted model finds its AR copy at <out>/ar-at-M)")
    a = ap.parse_args()
    if a.distill_every < 1:
        ap.error("--distill-every takes a count of at least 1 (1: every training pair)")
    sweep, dual = [], SEMI_AR_FAST[-1][1]  # the dual-cache row's decoder, at other blocks and thresholds
    for pair in filter(None, a.semi_ar.split(",")):
        b, _, t = pair.partition(":")
        b, t = int(b), float(t or 0.9)
        sweep.append((f"semi-AR, blocks of {b}, threshold {t:g}, stop at [EOS], dual cache",
                      {**dual, "sampler_options": {**dual["sampler_options"], "block": b, "threshold": t}}))
    if a.threads:
        torch.set_num_threads(a.threads)
    data = DATA / a.data
    test = load_pairs(load_config("spa2web-ar", [f"data.path={data}"]).data, "test")[a.test_skip: a.test_skip + a.test]
    refs = [t for _, t in test]
    out = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads", "minutes": a.minutes, "test": len(test),
           "test_skip": a.test_skip, "rows": []}
    copy = scores([s for s, _ in test], refs)
    out["rows"].append({"model": "copy the source", **copy})
    valid = load_pairs(load_config("spa2web-ar", [f"data.path={data}"]).data, "valid")[: a.valid]
    marks = sorted({*(float(m) for m in a.curve.split(",") if m), a.minutes})
    adapt = [float(m) for m in a.adapt_at.split(",") if m]
    for name in a.models.split(","):
        preset, overrides, decoders = MODELS[name]
        if sweep and SEMI_AR in decoders:
            decoders = sweep
        if name.endswith("-kd"):
            # the teacher's tokenizer, so the bounds (nats per token on the real valid targets) compare with its
            teacher = a.out / seeded("ar", a.seed)  # the AR run of the same seed
            overrides = [*overrides, f"data.path={distilled_data(a.out, data, a.seed, a.distill_every).resolve()}",
                         "tokenizer.type=hf", f"tokenizer.path={(teacher / 'tokenizer.json').resolve()}"]
        run_dir, before, own = a.out / name, 0.0, marks
        if a.seed:  # the same model from another seed: its own folder
            overrides, run_dir = [*overrides, f"train.seed={a.seed}"], a.out / seeded(name, a.seed)
        if name == "ar":
            own = sorted({*marks, *(m for m in adapt if m < a.minutes)})
        if "-adapt" in name or name == "ar-continue":  # the AR minutes count: it trains the rest of --minutes
            if len(adapt) != 1:
                raise SystemExit(f"spa2web: {name} starts from the AR model at --adapt-at M minutes: give one M")
            before = adapt[0]
            ar_at = (a.out / f"ar-at-{before:g}").resolve()
            if not (ar_at / "manifest.json").is_file():
                raise SystemExit(f"spa2web: {name} starts from {ar_at}: train --models ar --adapt-at {before:g} "
                                 "past that mark first")
            overrides = [*overrides, f"model.init={ar_at}", "tokenizer.type=hf", f"tokenizer.path={ar_at}"]
            run_dir = a.out / seeded(f"{name}-from-{before:g}", a.seed)
            own = [m - before for m in marks if m > before]
        # the decay over this run's own minutes, then the --set overrides (last: they win over the model's own)
        extra = [*([f"train.decay_minutes={a.minutes - before}"] if a.decay else []), *a.set]
        for m in own:  # train on to each mark (an exact resume: the minutes add up), then BLEU on valid there
            if m + before > a.minutes or (a.reuse and trained_minutes(run_dir) >= m - 0.05):
                if name == "ar" and m in adapt and not (a.out / f"ar-at-{m:g}").is_dir():
                    raise SystemExit(f"spa2web: the AR run is past {m:g} minutes without its copy there; "
                                     "train it again (without --reuse) for mdlm-adapt")
                continue
            fresh = not (a.reuse or m != own[0]) or not (run_dir / "checkpoint.safetensors").is_file()
            # a resumed run reads its own stored config (a preset edited meanwhile cannot break it), longer
            run = load_config(preset, [f"data.path={data}", f"train.max_minutes={m}", f"name={a.data}-{name}",
                                       "train.max_steps=1000000", "train.eval_every=1000000", *overrides, *extra]) \
                if fresh else load_config(str(run_dir / "config.json"), [f"train.max_minutes={m}"])
            Trainer(run, run_dir, overwrite=fresh, resume=not fresh, progress=False,
                    allow_changes=["train.max_minutes"]).fit()
            if name == "ar" and m in adapt:
                copy_model_folder(run_dir, a.out / f"ar-at-{m:g}")
            curve_point(run_dir, decoders, valid, before)
        if a.train_only:
            continue
        done = json.loads((run_dir / "curve.json").read_text()) if (run_dir / "curve.json").is_file() else {}
        if not any(abs(float(m) - before - trained_minutes(run_dir)) < 0.5 for m in done):  # this length: scored
            curve_point(run_dir, decoders, valid, before)
        # with --score-copies the AR run's copies at the --adapt-at marks too: what each adaptation starts from
        folders = [run_dir, *(a.out / f"ar-at-{m:g}" for m in (adapt if name == "ar" and a.score_copies else ()))]
        # --no-slow: the plain semi-AR row and the prefix cache's; a clean-causal model's rows without its cache
        skip = (SEMI_AR, SEMI_AR_FAST[1], *((SEMI_AR_FAST[0], ONE) if ADAPTED_CC[-1] in decoders else ()))
        for folder in folders:
            lm = DiffusionLM.from_pretrained(folder, device="cpu")
            with_src, without = source_use(lm)
            steps = json.loads((folder / "manifest.json").read_text())["step"]
            kjv_masked = a.data == "kjv2web" and lm.process.family == "masked"
            for label, kw in [*decoders, SOURCE_DRAFT] if kjv_masked else decoders:
                if a.no_slow and (label, kw) in skip:
                    continue
                if a.rows and not any(r in label for r in re.split(r",(?! )", a.rows)):
                    continue
                if kw.get("draft_from") == "ar":  # the AR model trained beside it writes the drafts (timed with it)
                    ar_run = a.out / seeded("ar", a.seed)
                    if not (ar_run / "model.safetensors").is_file():
                        continue
                    kw = {**kw, "draft_from": DiffusionLM.from_pretrained(ar_run, device="cpu")}
                t0 = time.perf_counter()
                outs = lm.generate_targets([s for s, _ in test], batch_size=32, truncate=True, **kw)
                sec = (time.perf_counter() - t0) / len(test)
                row = {"model": f"{folder.name} ({label})", **scores([o.prediction for o in outs], refs),
                       "nfe": sum(o.nfe for o in outs) / len(outs), "s_per_sentence": sec, "train_steps": steps,
                       "nats_with_source": with_src, "nats_without_source": without}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    if a.train_only:
        return
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / a.results).write_text(json.dumps(out, indent=2))
    plot_curves({d.name: d for d in sorted(a.out.iterdir()) if (d / "curve.json").is_file()},
                a.png or a.out / "curve.png")
    print(f"\n{out['date']}, {out['machine']}, {a.minutes:g} min of training each, {len(test)} test verses "
          f"from {a.test_skip}\n")
    print("| model | BLEU | chrF | ROUGE-L | nats/token with source | without | NFE | s/sentence | train steps |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        extra = ("| – | – | – | – | – |" if "nfe" not in r else
                 f"| {r['nats_with_source']:.2f} | {r['nats_without_source']:.2f} | {r['nfe']:.1f} | "
                 f"{r['s_per_sentence']:.3f} | {r['train_steps']} |")
        print(f"| {r['model']} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['rouge_l']:.1f} {extra}")


if __name__ == "__main__":
    main()
