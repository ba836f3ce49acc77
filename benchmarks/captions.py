"""Image captioning (issue 25) on compositional Fashion-MNIST scenes: every family that reads an image through the
encoder-decoder, trained for the same wall time on this CPU, scored by reading its captions back into facts.

    python benchmarks/captions.py --minutes 8 [--families masked,autoregressive,gaussian,uniform,sedd,d3pm,block,edit]
                                  [--test 500] [--threads 2] [--sanity 3] [--train-only]

Two families can train at once on one core each (`--threads 1 --train-only` in two processes); one `--reuse` run
then scores them.

Per family: fact precision / recall / F1 (``difflm.data.scenes.caption_metrics``), exact-scene accuracy, the F1 on
the 2-item test scenes, BLEU against the reference captions, NFE and seconds per caption, without and with
classifier-free guidance on the image (w = 1, or the weights --guidance gives; every model is trained with the image
dropped in 10% of rows). The AR captioner draws its tokens (temperature 1), decodes greedily (with and without
guidance) and by beam search (4).
--sanity M first trains a masked model for M minutes on single-item scenes with plain-class captions ("a bag").
masked-adapt: the AR captioner trained for --adapt-at minutes, then adapted to the masked family for the rest of
the wall time (AR→diffusion adaptation; the AR minutes count); block-adapt: the same to BD3-LM (blocks of 4, decoded
block by block, and by Fast-dLLM v2's threshold). Masked and edit captioners also start from the AR
captioner's captions (``caption(draft_from=)``, DiffusER's AR bootstrap) when <out>/autoregressive exists.
With model.scene_loss (``--set model.scene_loss=1``) each row also reports the % of test cells and of items whose
content the scene head names (``cells_right``, ``items_right``).
masked-len: the masked captioner with Mask-Predict's predicted length; masked-glat: on GLAT's glancing masks
(masked-glat-mix: half its rows masked at a random rate instead).
Writes <out>/results.json and a grid of test scenes with the AR and the best diffusion captions (--png).
Goal (issue 25): the best diffusion captioner's fact F1 within 5 points of the AR captioner's, and above 90% on
2-item scenes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
from datetime import date
from pathlib import Path

import numpy as np
import sacrebleu
import torch

from difflm.config import load_config
from difflm.data.datasets import image_tensor
from difflm.data.scenes import caption_metrics, patch_labels, scenes_for
from difflm.pipeline import DiffusionLM
from difflm.runfolder import copy_model_folder
from difflm.training.trainer import Trainer

PRESETS = {"masked": ("captions-mdlm", []), "autoregressive": ("captions-ar", []),
           "gaussian": ("captions-gaussian", []),
           "uniform": ("captions-mdlm", ["process={type: uniform}", "sample.sampler=ancestral", "sample.steps=32"]),
           "sedd": ("captions-mdlm", ["process={type: sedd}", "sample.sampler=euler", "sample.steps=32"]),
           "d3pm": ("captions-mdlm", ["process={type: d3pm}", "sample.sampler=ancestral", "sample.steps=32"]),
           # BD3-LM: 6 blocks of 4 tokens, 4 steps each (the block sampler's budget is over the whole row)
           "block": ("captions-mdlm", ["process={type: block, block_size: 4}", "sample.sampler=block",
                                       "sample.steps=24"]),
           # DiffusER: the tagger and generator read the caption from position 0, the image by cross-attention
           "edit": ("captions-mdlm", ["process={type: edit}", "sample.sampler=diffuser", "sample.steps=10"]),
           # AR→diffusion adaptation at equal wall time: the AR captioner trained for --adapt-at minutes
           # (<out>/ar-at-M), then trained on as a masked model (its weights, tokenizer and next-token decoder kept:
           # model.init, model.shift; Mask-Predict's loss) for the rest of --minutes
           "masked-adapt": ("captions-mdlm", ["process.loss=cmlm", "model.shift=true"]),
           "masked-adapt-noshift": ("captions-mdlm", ["process.loss=cmlm"]),  # the same, output i predicting token i
           # ... trained on the context semi-AR decoding reads (process.mask_layout blocks: a clean prefix, one block
           # masked at the drawn rate, every later position [MASK]; the loss on the block), blocks of 4 or of 1 (the
           # AR parent's own context, read with bidirectional attention)
           "masked-adapt-blocks4": ("captions-mdlm", ["process.loss=cmlm", "model.shift=true",
                                                      "process.mask_layout=blocks", "process.mask_block=4"]),
           "masked-adapt-blocks1": ("captions-mdlm", ["process.loss=cmlm", "model.shift=true",
                                                      "process.mask_layout=blocks", "process.mask_block=1"]),
           # ... with clean-causal attention (process.attention): clean positions read only the clean positions up to
           # them, as in the AR parent, and each [MASK] reads those and itself, so at the switch semi-AR decoding's
           # first [MASK] after the prefix is predicted exactly as the parent predicts its next token; random masks,
           # or the blocks-of-4 layout
           "masked-adapt-cc": ("captions-mdlm", ["process.loss=cmlm", "model.shift=true",
                                                 "process.attention=clean-causal"]),
           "masked-adapt-blocks4-cc": ("captions-mdlm", ["process.loss=cmlm", "model.shift=true",
                                                         "process.attention=clean-causal",
                                                         "process.mask_layout=blocks", "process.mask_block=4"]),
           # ... scoring the clean positions up to the block too (process.clean_targets: a shifted prediction never
           # reads its own position, so each is scored as if masked; the clean prefix by the parent's AR loss)
           "masked-adapt-blocks4-cc-ct": ("captions-mdlm", ["process.loss=cmlm", "model.shift=true",
                                                            "process.attention=clean-causal",
                                                            "process.mask_layout=blocks", "process.mask_block=4",
                                                            "process.clean_targets=true"]),
           # ... with each [MASK] also reading the [MASK]s before it (process.attention clean-causal-masks), so the
           # masks of a block can agree; clean positions read as before
           "masked-adapt-blocks4-ccm-ct": ("captions-mdlm", ["process.loss=cmlm", "model.shift=true",
                                                             "process.attention=clean-causal-masks",
                                                             "process.mask_layout=blocks", "process.mask_block=4",
                                                             "process.clean_targets=true"]),
           # ... adapted to BD3-LM instead (Fast-dLLM v2, SDAR): blocks of 4, attention opened from causal to
           # block-causal over the first 50 steps, BD3-LM's loss; the earlier blocks exact in the KV cache
           "block-adapt": ("captions-mdlm", ["process={type: block, block_size: 4}", "model.shift=true",
                                             "model.anneal_steps=50", "sample.sampler=block", "sample.steps=24"]),
           # the control for an adaptation: the AR captioner restarted from the same copy with a fresh optimizer and
           # the same schedule, its objective unchanged
           "ar-continue": ("captions-ar", []),
           # ... with the decoder's attention opened from causal over the first 1,000 steps (DiffuLLaMA's annealing)
           "masked-adapt-anneal": ("captions-mdlm", ["process.loss=cmlm", "model.shift=true",
                                                     "model.anneal_steps=1000"]),
           "masked-adapt-noshift-anneal": ("captions-mdlm", ["process.loss=cmlm", "model.anneal_steps=1000"]),
           # Mask-Predict's length prediction (the encoder predicts the caption's length; the [EOS] fill is given,
           # not modelled) and GLAT's glancing masks, from scratch
           "masked-len": ("captions-mdlm", ["data.target_length=predicted"]),
           "masked-glat": ("captions-mdlm", ["process.loss=glat"]),
           # ... with half the rows masked at a random rate (glancing alone never trains on the all-[MASK] row)
           "masked-glat-mix": ("captions-mdlm", ["process.loss=glat", "process.glance_mix=0.5"])}
# masked captioners also decode semi-autoregressively (blocks of 4 from the caption's start, argmax tokens, the most
# confident first: LLaDA's blocks with 2 tokens a call, or Fast-dLLM's threshold), without guidance
SEMI_AR = [("semi-AR, blocks of 4, 12 steps", {"sampler": "confidence", "steps": 12,
                                               "sampler_options": {"block": 4, "greedy": True}}),
           ("semi-AR, blocks of 4, threshold 0.9", {"sampler": "threshold",
                                                     "sampler_options": {"block": 4, "greedy": True}}),
           # the same, rows ended once settled and Fast-dLLM's dual cache (keys outside the block stored on entry)
           ("semi-AR, blocks of 4, threshold 0.9, stop at [EOS], dual cache",
            {"sampler": "threshold", "sampler_options": {"block": 4, "greedy": True, "stop_at_eos": True,
                                                          "kv_cache": "dual"}})]


def score(lm: DiffusionLM, scenes, guidance: float, **decoder) -> dict:
    t0 = time.perf_counter()
    outs = lm.caption([s.image for s in scenes], batch_size=64, guidance=guidance, **decoder)
    sec = (time.perf_counter() - t0) / len(scenes)
    preds = [o.prediction for o in outs]
    refs = [[s.captions[k % len(s.captions)] for s in scenes] for k in range(3)]
    two = [i for i, s in enumerate(scenes) if len(s.items) == 2]
    m = caption_metrics(preds, scenes)
    m2 = caption_metrics([preds[i] for i in two], [scenes[i] for i in two]) if two else {"fact_f1": float("nan")}
    return {**m, "fact_f1_2items": m2["fact_f1"], "bleu": sacrebleu.corpus_bleu(preds, refs).score,
            "nfe": sum(o.nfe for o in outs) / len(outs), "s_per_caption": sec, "predictions": preds}


def cells_right(lm: DiffusionLM, scenes) -> dict:
    """With model.scene_loss: the % of test cells whose content (nothing, or size × class) the scene head names,
    each cell's patches' log-probabilities summed; and the % of items (cells that hold one)."""
    if not getattr(lm.model.cfg, "scene_loss", 0):
        return {}
    images = image_tensor(np.stack([s.image for s in scenes]))
    with torch.no_grad():
        logp = lm.model.eval().encode_image(images, torch.zeros(len(scenes), dtype=torch.long)).scene_logits
    logp = logp.log_softmax(-1)  # (N, P, C)
    grid = math.isqrt(logp.shape[1])
    cell = patch_labels(torch.arange(4)[None], grid)[0]  # the cell of each patch
    per_cell = torch.stack([logp[:, cell == c].sum(1) for c in range(4)], 1).argmax(-1)  # (N, 4)
    want = torch.from_numpy(np.stack([s.cell_labels() for s in scenes]))
    held = want > 0
    return {"cells_right": 100 * (per_cell == want).float().mean().item(),
            "items_right": 100 * (per_cell == want)[held].float().mean().item()}


def train(preset: str, overrides: list[str], out: Path, minutes: float, name: str,
          snapshots: tuple[float, ...] = (), decay: float | None = None) -> int:
    """Train ``minutes`` of wall time into ``out``; at each of the ``snapshots`` minute marks on the way, pause and
    copy the model folder to <out's parent>/ar-at-M (an exact resume carries on from there). ``decay``: the
    learning rate decays (cosine, to min_lr_ratio) over that many minutes of training, not over max_steps."""
    marks = sorted({*(m for m in snapshots if m < minutes), minutes})
    sched = [f"train.decay_minutes={decay}"] if decay else []
    for k, m in enumerate(marks):  # after the first segment the run reads its own stored config, longer (a preset
        # edited meanwhile cannot break it)
        run = load_config(preset, [f"train.max_minutes={m}", "train.max_steps=1000000", "train.eval_every=1000000",
                                   f"name={name}", *sched, *overrides]) if k == 0 \
            else load_config(str(out / "config.json"), [f"train.max_minutes={m}"])
        Trainer(run, out, overwrite=k == 0, resume=k > 0, progress=False, allow_changes=["train.max_minutes"]).fit()
        if m in snapshots:
            copy_model_folder(out, out.parent / f"ar-at-{m:g}")
    return json.loads((out / "manifest.json").read_text())["step"]


def grid(scenes, rows: dict[str, list[str]], png: Path, n: int = 12) -> None:
    """Test scenes with their reference and generated captions, 4 per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, n = 4, min(n, len(scenes))
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 5.8 * nrows), gridspec_kw={"hspace": 0.75})
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(scenes[k].image, cmap="gray", vmin=0, vmax=255)
        text = [f"ref: {scenes[k].captions[0]}"] + [f"{name}: {preds[k]}" for name, preds in rows.items()]
        ax.set_title("\n".join(_wrap(t) for t in text), fontsize=8, loc="left")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90, bbox_inches="tight")


def _wrap(text: str, width: int = 52) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join([*lines, cur])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=8)
    ap.add_argument("--families", default=",".join(PRESETS))
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--sanity", type=float, default=0, help="minutes for the single-item sanity model (0: none)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/captions"))
    ap.add_argument("--png", type=Path, default=None, help="the caption grid (default <out>/grid.png)")
    ap.add_argument("--reuse", action="store_true", help="score the runs already in --out instead of training them")
    ap.add_argument("--train-only", action="store_true", help="train the families, score nothing")
    ap.add_argument("--adapt-at", default="", help="minute marks (e.g. 7.5,11.25) at which the AR captioner copies "
                                                   "itself (<out>/ar-at-M); a masked-adapt family starts from the one "
                                                   "it is given (<out>/<family>-from-M; default: half of --minutes)")
    ap.add_argument("--decay", action="store_true",
                    help="each run's learning rate decays over its own wall time (train.decay_minutes; an adapted "
                         "run over its own minutes, after its AR copy's) instead of staying at the peak")
    ap.add_argument("--rows", default="", help="score only the decoders whose label holds one of these "
                                               "comma-separated strings (the plain decoder's label is empty);"
                                               " a comma and a space belong to the string ('semi-AR, blocks of 4')")
    ap.add_argument("--guidance", default="1", help="comma-separated classifier-free guidance weights w, one CFG row "
                                                    "each (on the plain decoder and the masked captioners' semi-AR "
                                                    "threshold decoder; 0 or '': no CFG rows)")
    ap.add_argument("--semi-ar", default="", metavar="B:T,...",
                    help="more semi-AR rows for masked captioners: blocks of B, threshold T (e.g. 1:0.9,8:0.9,4:0.5), "
                         "each also with the --guidance weights")
    ap.add_argument("--speculative", default="", metavar="K,...",
                    help="for clean-causal shifted masked captioners: a self-speculative row per draft length K "
                         "(e.g. 2,4; the text of blocks of 1 in fewer calls), and blocks of 1 stopping at [EOS]")
    ap.add_argument("--results", default="results.json", help="the file under --out the scores go to")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every family (repeatable), e.g. model.absolute_scale=1.0")
    a = ap.parse_args()
    adapt = tuple(float(m) for m in a.adapt_at.split(",") if m) or (a.minutes / 2,)
    try:
        weights = [w for w in (float(w) for w in a.guidance.split(",") if w) if w]  # w = 0 is the plain rows
        grid_rows = [(int(b), float(t)) for b, t in (g.split(":") for g in a.semi_ar.split(",") if g)]
        drafts = [int(k) for k in a.speculative.split(",") if k]
    except ValueError:
        ap.error("--guidance takes numbers (e.g. 0.5,1), --semi-ar block:threshold pairs (e.g. 1:0.9,8:0.9) and "
                 "--speculative draft lengths (e.g. 2,4)")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads", "minutes": a.minutes, "rows": []}
    if a.sanity:
        d = a.out / "sanity"
        steps = train("captions-mdlm", ["data.scene_items=1"], d, a.sanity, "captions-sanity")
        lm = DiffusionLM.from_pretrained(d, device="cpu")
        scenes = scenes_for(lm.run.data, "test")[: a.test]
        r = score(lm, scenes, 0.0)
        row = {"model": "masked, single items (plain class)", "train_steps": steps, "minutes": a.sanity,
               **{k: v for k, v in r.items() if k != "predictions"}}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    preds_by = {}
    scenes = None
    for fam in a.families.split(","):
        preset, overrides = PRESETS[fam]
        d, minutes, snaps = a.out / fam, a.minutes, adapt if fam == "autoregressive" else ()
        if fam.startswith(("masked-adapt", "block-adapt")) or fam == "ar-continue":
            if len(adapt) != 1:
                raise SystemExit(f"captions: {fam} starts from one AR mark: give one --adapt-at M")
            ar_at = (a.out / f"ar-at-{adapt[0]:g}").resolve()
            if not (ar_at / "manifest.json").is_file():
                # the AR run's copy at the mark: its schedule runs over the whole --minutes
                train(*PRESETS["autoregressive"], ar_at, adapt[0], "captions-autoregressive",
                      decay=a.minutes if a.decay else None)
            overrides = [*overrides, f"model.init={ar_at}", "tokenizer.type=hf", f"tokenizer.path={ar_at}"]
            parent = json.loads((ar_at / "config.json").read_text())["run"]
            if parent["data"].get("scene_stream"):  # go on along the AR run's stream, past the scenes it saw
                seen = json.loads((ar_at / "manifest.json").read_text())["step"] * parent["train"]["batch_size"]
                overrides.append(f"data.stream_start={parent['data'].get('stream_start', 0) + seen}")
            d, minutes = a.out / f"{fam}-from-{adapt[0]:g}", a.minutes - adapt[0]
        if a.reuse and (d / "model.safetensors").is_file():
            steps = json.loads((d / "manifest.json").read_text())["step"]
        else:
            steps = train(preset, [*overrides, *a.set], d, minutes, f"captions-{fam}", snaps,
                          minutes if a.decay else None)
        if a.train_only:
            continue
        lm = DiffusionLM.from_pretrained(d, device="cpu")
        scenes = scenes_for(lm.run.data, "test")[: a.test]
        head = cells_right(lm, scenes)  # the model's, the same for every decoder row
        # AR's first rows draw each token (temperature 1), as the presets did until 2026-12-05, so they mean the same
        # in every run folder; then greedy (the preset's default since) and beam search
        drawn = {"sampler_options": {"greedy": False}} if lm.process.family == "autoregressive" else {}
        decoders = [("", 0.0, drawn), *((f" (CFG w={w:g})", w, drawn) for w in weights)]
        if lm.process.family == "autoregressive":
            greedy = {"sampler_options": {"greedy": True}}
            decoders += [(" (greedy)", 0.0, greedy), *((f" (greedy, CFG w={w:g})", w, greedy) for w in weights),
                         (" (beam 4)", 0.0, {"sampler_options": {"beam": 4}})]
        if lm.process.family == "masked":
            # clean-causal attention refuses Fast-dLLM's approximate cache and has an exact one (the same text)
            causal = getattr(lm.process.options, "clean_causal", False)  # either clean-causal attention
            for label, kw in SEMI_AR:
                if causal and "kv_cache" in kw["sampler_options"]:
                    label = label.replace("dual cache", "causal cache")
                    kw = {**kw, "sampler_options": {**kw["sampler_options"], "kv_cache": "causal"}}
                decoders.append((f" ({label})", 0.0, kw))
            # guidance on the best decoder
            decoders += [(f" ({SEMI_AR[1][0]}, CFG w={w:g})", w, SEMI_AR[1][1]) for w in weights]
            for b, t in grid_rows:  # each without and with guidance
                kw = {"sampler": "threshold", "sampler_options": {"block": b, "greedy": True, "threshold": t,
                                                                   **({"kv_cache": "causal"} if causal else {})}}
                label = f"semi-AR, blocks of {b}, threshold {t:g}{', causal cache' if causal else ''}"
                decoders += [(f" ({label}{f', CFG w={w:g}' if w else ''})", w, kw) for w in (0.0, *weights)]
            if causal and getattr(lm.model.cfg, "shift", False):  # decoders of the exact next-token predictions
                decoders.append((" (beam 4, causal cache)", 0.0,  # AR's beam search on the adapted model
                                 {"sampler": "beam", "sampler_options": {"beam": 4, "kv_cache": "causal"}}))
                if drafts:
                    stop = {"stop_at_eos": True, "kv_cache": "causal"}
                    decoders += [(" (semi-AR, blocks of 1, stop at [EOS], causal cache)", 0.0,
                                  {"sampler": "threshold", "sampler_options": {"block": 1, "greedy": True, **stop}}),
                                 *((f" (speculative, draft {k}, stop at [EOS], causal cache)", 0.0,
                                    {"sampler": "speculative", "sampler_options": {"draft": k, **stop}})
                                   for k in drafts)]
        if lm.process.family == "block":  # argmax tokens; and Fast-dLLM v2's parallel decoding (above 0.9 in a call)
            decoders += [(" (greedy, stop at [EOS])", 0.0,
                          {"sampler": "block", "sampler_options": {"greedy": True, "stop_at_eos": True}}),
                         (" (threshold 0.9, stop at [EOS])", 0.0,
                          {"sampler": "block", "sampler_options": {"threshold": 0.9, "stop_at_eos": True}})]
        ar_dir = a.out / "autoregressive"
        if lm.process.family in ("masked", "edit") and (ar_dir / "model.safetensors").is_file():
            # DiffusER's AR bootstrap: the AR captioner's captions (timed with it) revised or refined
            ar = DiffusionLM.from_pretrained(ar_dir, device="cpu")
            decoders.append((" (AR draft, mask-predict from 5 of 10)", 0.0, {"sampler": "mask-predict", "steps": 10,
                                                                             "draft_from": ar})
                            if lm.process.family == "masked" else (" (AR draft)", 0.0, {"draft_from": ar}))
        for label, w, kw in decoders:
            if a.rows and not any(r in label for r in re.split(r",(?! )", a.rows)):
                continue
            r = {**score(lm, scenes, w, **kw), **head}
            name = f"{d.name}{label}"
            preds_by[name] = r.pop("predictions")
            row = {"model": name, "sampler": kw.get("sampler", lm.run.sample.sampler),  # NFE: the refiner's only
                   "steps": kw.get("steps", lm.run.sample.steps), "train_steps": steps, **r}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    if a.train_only:
        return
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / a.results).write_text(json.dumps(out, indent=2))
    not_diffusion = ("autoregressive", "ar-continue", "masked, single")
    diffusion = [r for r in out["rows"] if not r["model"].startswith(not_diffusion)]
    if scenes is not None and diffusion:
        best = max(diffusion, key=lambda r: r["fact_f1"])["model"]
        shown = {best: preds_by[best]}
        if "autoregressive" in preds_by:
            shown["autoregressive"] = preds_by["autoregressive"]
        grid(scenes, shown, a.png or a.out / "grid.png")
    print(f"\n{out['date']}, {out['machine']}, {a.minutes:g} min of training each, {a.test} test scenes\n")
    print("| model | fact P | fact R | fact F1 | F1, 2 items | exact | parsed | BLEU | NFE | s/caption | train steps "
          "| items named by the scene head |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        head = f"{r['items_right']:.1f}" if "items_right" in r else ""
        print(f"| {r['model']} | {r['fact_precision']:.1f} | {r['fact_recall']:.1f} | {r['fact_f1']:.1f} | "
              f"{r['fact_f1_2items']:.1f} | {r['exact']:.1f} | {r['parsed']:.1f} | {r['bleu']:.1f} | "
              f"{r['nfe']:.1f} | {r['s_per_caption']:.4f} | {r['train_steps']} | {head} |")


if __name__ == "__main__":
    main()
