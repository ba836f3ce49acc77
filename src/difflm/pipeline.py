"""The high-level API: ``DiffusionLM.from_pretrained(dir)`` with ``generate``, ``infill``, ``score`` and
``save_pretrained``. A saved model is a folder: config.json, model.safetensors, tokenizer.json."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .components import default_device, read_model_folder, write_model_folder
from .config import RunConfig
from .data.datasets import condition_positions, make_batch
from .data.tokenizers import Tokenizer
from .diffusion import Batch, Process, low_discrepancy_uniform
from .errors import DiffLMError
from .evaluation.likelihood import EvalResult, evaluate
from .models.seq2seq import bind_source, reads_source
from .precision import autocast
from .rng import seed_rows, uniform
from .sampling import Conditioning, get_sampler, sampler_fits
from .sampling.base import OnStep, Sampler, Trajectory
from .sampling.guidance import ClassifierFreeGuidance

GAP = re.compile(r"\[MASK\]|_{3,}")


@dataclass
class Generation:
    texts: list[str]
    tokens: torch.Tensor  # (N, L)
    nfe: torch.Tensor  # (N,) network calls per sequence


@dataclass
class Transduction:
    """One source's output: ``prediction`` (the MBR choice among ``candidates``, or the first)."""

    source: str
    prediction: str
    candidates: list[str]
    nfe: float  # network calls per candidate, mean


@dataclass
class Caption:
    """One image's caption: ``prediction`` (the MBR choice among ``candidates``, or the first)."""

    image: str
    prediction: str
    candidates: list[str]
    nfe: float  # network calls per candidate, mean


@dataclass
class Job:
    """One request's rows, ready for a sampler (``DiffusionLM.prepare_*``): ``cond`` (N, L) and the sampling
    settings; ``finish(tokens (N, L), nfe (N,))`` turns the sampled rows into the request's answer. Jobs with the
    same ``DiffusionLM.batch_key`` run as one batch (``run_jobs``) with the same results as each alone."""

    cond: Conditioning
    finish: Callable[[torch.Tensor, torch.Tensor], Any]
    sampler: str | None = None
    sampler_options: dict | None = None
    steps: int | None = None
    seed: int = 0
    temperature: float | None = None
    top_p: float | None = None
    guidance: float = 0.0

    @property
    def rows(self) -> int:
        return self.cond.shape[0]


@dataclass
class Plan:
    """A job's sampler and settings, resolved against the model's defaults and checked."""

    sampler: Sampler
    steps: int
    temperature: float
    top_p: float
    guidance: float


class DiffusionLM:
    """A trained model with its process and tokenizer."""

    def __init__(self, model: nn.Module, process: Process, tokenizer: Tokenizer, run: RunConfig,
                 length_prior: list[float] | None = None, device: str | torch.device = "cpu") -> None:
        self.model, self.process, self.tokenizer, self.run = model, process, tokenizer, run
        self.length_prior = length_prior
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.process.to(self.device)

    @property
    def seq_len(self) -> int:
        return self.run.data.seq_len

    # -- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write the model folder: config.json, model.safetensors, tokenizer.json."""
        write_model_folder(Path(path), self.model, self.tokenizer, self.run, self.length_prior)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> DiffusionLM:
        """Load a model folder (a finished or running training run, or ``save_pretrained``'s output) onto
        ``device`` (default: CUDA when available)."""
        model, process, tokenizer, run, length_prior = read_model_folder(Path(path))
        return cls(model, process, tokenizer, run, length_prior, device or default_device())

    # -- helpers ---------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Text (may span lines) -> ids, a line break becoming [EOS]."""
        ids: list[int] = []
        for i, line in enumerate(text.split("\n")):
            if i:
                ids.append(self.tokenizer.eos_id)
            ids.extend(self.tokenizer.encode(line))
        return ids

    def _layout(self, ids: list[int], fixed: list[bool], length: int) -> tuple[list[int], list[bool]]:
        """Place given ids in a row of ``length``: lines-mode models get [EOS] + fixed padding after them."""
        if self.run.data.mode == "lines" and len(ids) < length:
            ids = [*ids, self.tokenizer.eos_id]
            fixed = [*fixed, True]
            pad = length - len(ids)
            return ids + [self.tokenizer.pad_id] * pad, fixed + [True] * pad
        return ids + [self.tokenizer.mask_id] * (length - len(ids)), fixed + [False] * (length - len(ids))

    def _check_length(self, n: int, length: int, what: str) -> None:
        if n > length:
            raise DiffLMError(
                f"the {what} is {n} tokens but the model generates at most {length} "
                f"(data.seq_len={self.seq_len}); shorten it"
            )

    def preferred_sampler(self) -> str | None:
        """The config's ``sample.sampler`` when it fits this family (None when unset or the family was swapped: the
        family's own default sampler then runs)."""
        name = self.run.sample.sampler
        return name if name is not None and sampler_fits(name, self.process) else None

    def plan(self, job: Job) -> Plan:
        """The job's sampler (the preset's when it fits the family) and settings, checked: one-line errors for
        an unknown sampler or option, steps < 1, temperature ≤ 0, top-p outside (0, 1], a start the model was
        not trained for."""
        preferred = self.preferred_sampler()
        # the preset's options for its own sampler (sample.options), under the job's; a job that names its sampler
        # starts from that sampler's own defaults
        defaults = self.run.sample.options if job.sampler is None and preferred is not None else {}
        smp = get_sampler(job.sampler or preferred, self.process, **(defaults | (job.sampler_options or {})))
        self._check_start(smp, job.cond)
        steps = self.run.sample.steps if job.steps is None else job.steps
        if steps < 1:
            raise DiffLMError(f"--steps must be at least 1, got {steps}")
        temperature = self.run.sample.temperature if job.temperature is None else job.temperature
        top_p = self.run.sample.top_p if job.top_p is None else job.top_p
        if temperature <= 0 or not 0 < top_p <= 1:
            raise DiffLMError("--temperature must be > 0 and --top-p in (0, 1]")
        if job.guidance and self.run.train.cond_dropout <= 0:
            raise DiffLMError("--guidance needs a model trained with the source dropped: train.cond_dropout > 0")
        return Plan(smp, steps, temperature, top_p, job.guidance)

    def batch_key(self, job: Job) -> tuple:
        """Jobs with equal keys can share a batch: same sampler and options, steps, temperature, top-p,
        guidance and row length."""
        p = self.plan(job)
        opts = tuple(sorted(vars(p.sampler.options).items()))
        return (p.sampler.name, opts, p.steps, p.temperature, p.top_p, p.guidance, job.cond.shape[1])

    def run_jobs(self, jobs: list[Job], *, bf16: bool = True, on_step: OnStep | None = None) -> list[Any]:
        """Sample jobs that share a ``batch_key`` as one batch — each row keyed on its own job's seed and its
        index within the job, so every job gets what it would get alone — and return each job's answer."""
        plan = self.plan(jobs[0])
        tokens = torch.cat([j.cond.tokens for j in jobs])
        fixed = torch.cat([j.cond.fixed for j in jobs])
        images = None if jobs[0].cond.images is None else torch.cat([j.cond.images for j in jobs])
        seeds = torch.cat([torch.full((j.rows,), j.seed, dtype=torch.long) for j in jobs])
        rows = torch.cat([torch.arange(j.rows) for j in jobs])
        toks, nfe = self._run(plan, Conditioning(tokens, fixed, images), seeds, rows, batch_size=len(rows), bf16=bf16,
                              on_step=on_step)
        out, a = [], 0
        for j in jobs:
            out.append(j.finish(toks[a : a + j.rows], nfe[a : a + j.rows]))
            a += j.rows
        return out

    def _sample_job(self, job: Job, *, batch_size: int, bf16: bool, on_step: OnStep | None) -> Any:
        """One job in chunks of ``batch_size`` rows (same results at any size)."""
        if batch_size < 1:
            raise DiffLMError(f"--batch-size must be at least 1, got {batch_size}")
        plan = self.plan(job)
        toks, nfe = self._run(plan, job.cond, job.seed, torch.arange(job.rows), batch_size=batch_size, bf16=bf16,
                              on_step=on_step)
        return job.finish(toks, nfe)

    def _run(self, plan: Plan, cond: Conditioning, seed: int | torch.Tensor, rows: torch.Tensor, *,
             batch_size: int, bf16: bool, on_step: OnStep | None) -> tuple[torch.Tensor, torch.Tensor]:
        toks, nfes = [], []
        N = cond.shape[0]
        for a in range(0, N, batch_size):
            idx = torch.arange(a, min(N, a + batch_size))
            s = seed_rows(seed, idx)
            s = s.to(self.device) if isinstance(s, torch.Tensor) else s
            with autocast(self.device, bf16):
                part = cond.rows(idx).to(self.device)
                out = plan.sampler(self._guided(plan, part), self.process, part, steps=plan.steps, seed=s,
                                   rows=rows[idx].to(self.device), temperature=plan.temperature, top_p=plan.top_p,
                                   on_step=on_step)
            toks.append(out.tokens.cpu())
            nfes.append(out.nfe.cpu())
        return torch.cat(toks), torch.cat(nfes)

    def _guided(self, plan: Plan, cond: Conditioning) -> nn.Module:
        """The network the sampler calls: the model (an encoder-decoder reading the rows' sources), or its
        classifier-free-guided mix with the source dropped."""
        model = bind_source(self.model, self.process, cond.tokens, cond.images)
        if not plan.guidance:
            return model
        source = condition_positions(cond.tokens, cond.fixed, self.tokenizer.bos_id)
        return ClassifierFreeGuidance(model, source, self.tokenizer.pad_id, plan.guidance)

    # -- continuous batching (stepwise samplers) ---------------------------------------------------------
    def begin_job(self, job: Job, plan: Plan) -> Trajectory:
        """The job's rows at t = 1 on the model's device, for a stepwise sampler (``plan.sampler.stepwise``):
        ``advance`` moves them, alone or with the rows of other jobs of the same ``batch_key`` joined at any
        step, and each row ends where ``run_jobs`` would take it."""
        cond = job.cond.to(self.device)
        return plan.sampler.begin(self.process, cond, steps=plan.steps, seed=job.seed,
                                  rows=torch.arange(job.rows, device=self.device))

    @torch.no_grad()
    def advance(self, plan: Plan, traj: Trajectory, *, bf16: bool = True) -> Trajectory:
        """Every row of ``traj`` one step down its own chain (rows of any jobs that share ``plan``'s key)."""
        with autocast(self.device, bf16):
            return plan.sampler.advance(self._guided(plan, traj.cond), self.process, traj, steps=plan.steps,
                                        temperature=plan.temperature, top_p=plan.top_p)

    def _check_start(self, smp, cond: Conditioning) -> None:
        """A one-line error when an edit-family sampler would start where the model was never trained to: a
        seq2seq model from anything but a draft, an Edit Flows model from another x_0 than its training source."""
        from .sampling.edit import resolve_start

        kind = getattr(smp.options, "bootstrap", None)
        if kind is None or not hasattr(self.process, "trained_starts"):
            return
        encoder = reads_source(self.model)
        seq2seq = self.run.data.mode == "pairs" and not encoder  # an encoder-decoder's target is corrupted data
        kind, _ = resolve_start(kind, self.process, cond, encoder)  # the sampler's own reading of "default" and drafts
        trained = self.process.trained_starts(seq2seq)
        if kind in trained:
            return
        if seq2seq:
            raise DiffLMError(f"this {self.process.family} model was trained on source/target pairs, so it starts "
                              f"from a draft, not from {kind}: give it texts (difflm revise --text, or difflm "
                              "generate with sources)")
        if kind == "draft":
            raise DiffLMError(f"this {self.process.family} model was trained to write from {trained[0]} sequences, "
                              "not to revise a draft: train it on pairs (data.corpus: pairs) to revise texts")
        raise DiffLMError(f"this {self.process.family} model was trained from {trained[0]} starts, not from {kind}: "
                          f"sample it with bootstrap={trained[0]}")

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Token rows (N, L) -> texts, cut as ``generate`` cuts them (at [EOS] in lines mode, at [PAD])."""
        return [self._decode_row(r) for r in tokens]

    def _decode_target(self, ids: list[int]) -> str:
        """A generated target (seq2seq, caption) up to its first [EOS]."""
        eos = self.tokenizer.eos_id
        return self.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)

    def _decode_row(self, row: torch.Tensor) -> str:
        ids = row.tolist()
        if self.run.data.mode == "lines" and self.tokenizer.eos_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_id)]
        if self.tokenizer.pad_id in ids:  # a sampler that stopped the row (block --stop-at-eos)
            ids = ids[: ids.index(self.tokenizer.pad_id)]
        return self.tokenizer.decode(ids)

    def require_seq2seq(self) -> None:
        """A one-line error unless the model was trained on source/target pairs."""
        if self.run.data.corpus == "scenes":
            raise DiffLMError("this model captions images; it has no text sources: use difflm caption RUN IMAGE.png")
        if self.run.data.mode != "pairs":
            raise DiffLMError(
                "this model was not trained on source/target pairs; train a seq2seq preset (data.corpus: pairs) "
                "or use difflm sample / infill"
            )

    # -- public API ------------------------------------------------------------------------------
    def generate(
        self, num: int = 4, length: int | None = None, *, prompt: str | None = None, steps: int | None = None,
        sampler: str | None = None, seed: int = 0, temperature: float | None = None, top_p: float | None = None,
        batch_size: int = 16, on_step: OnStep | None = None, bf16: bool = True,
        sampler_options: dict | None = None,
    ) -> Generation:
        """Sample ``num`` sequences of ``length`` tokens (default: the training length), optionally
        continuing ``prompt``. Same seed -> same texts, whatever the batch size."""
        job = self.prepare_generate(num, length, prompt=prompt, steps=steps, sampler=sampler, seed=seed,
                                    temperature=temperature, top_p=top_p, sampler_options=sampler_options)
        return self._sample_job(job, batch_size=batch_size, bf16=bf16, on_step=on_step)

    def prepare_generate(
        self, num: int = 4, length: int | None = None, *, prompt: str | None = None, steps: int | None = None,
        sampler: str | None = None, seed: int = 0, temperature: float | None = None, top_p: float | None = None,
        sampler_options: dict | None = None,
    ) -> Job:
        """``generate``'s rows as a Job (its answer a ``Generation``), for ``run_jobs``."""
        if num < 1:
            raise DiffLMError(f"--num must be at least 1, got {num}")
        length = self.seq_len if length is None else length
        if length < 1 or length > self.seq_len:
            raise DiffLMError(f"--length must be between 1 and the model's length {self.seq_len}, got {length}")
        cond = Conditioning.unconditional(num, length, fill=self.tokenizer.mask_id)
        ids: list[int] = []
        if prompt:
            ids = self.encode_text(prompt)
            self._check_length(len(ids), length, "prompt")
            cond.tokens[:, : len(ids)] = torch.tensor(ids)
            cond.fixed[:, : len(ids)] = True
        elif self.process.draws_length:
            # a model trained on padded lines sees where padding starts: draw each length from the prior
            # (families that generate their length, e.g. block diffusion's [EOS], are not handed one)
            u = uniform(seed, torch.arange(num), 0, 1, stream=11)[:, 0]
            n = self.process.sample_length(u).clamp(max=length).cpu()  # tokens incl. [EOS]
            pos = torch.arange(length)[None]
            pad, eos = pos >= n[:, None], pos == n[:, None] - 1
            cond.tokens[pad] = self.tokenizer.pad_id
            cond.tokens[eos] = self.tokenizer.eos_id
            cond.fixed |= pad | eos

        def finish(toks: torch.Tensor, nfe: torch.Tensor) -> Generation:
            texts = [self._decode_row(r) for r in toks]
            if ids:  # the prompt as the user wrote it (characters the tokenizer never saw would decode as [UNK])
                head = self._decode_row(torch.tensor(ids))
                texts = [prompt + t[len(head):] if t.startswith(head) else t for t in texts]
            return Generation(texts, toks, nfe)

        return Job(cond, finish, sampler, sampler_options, steps, seed, temperature, top_p)

    def revise(self, text: str, *, steps: int | None = None, beam: tuple[int, int] | None = None, seed: int = 0,
               greedy: bool | None = None, temperature: float | None = None, top_p: float | None = None,
               bf16: bool = True) -> dict:
        """Edit ``text`` with an edit-family model: ``steps`` revisions from the text as draft — DiffusER greedy
        (the default: on typo correction drawn tags and tokens broke 8% of the correct words, argmax 1%), sampled
        (``greedy=False``) or by 2D beam search (``beam`` = (b, r)); Edit Flows by τ-leaping from the text as x_0
        (``greedy=True`` is refused). Returns
        {"text", "revisions": [{"step", "ops": [{"op", "at", "token" | "count"}], "text"}], "nfe"} — every
        revision's operations at their positions in the sequence it edited."""
        from .sampling.edit import DiffuserSampler
        from .sampling.editflow import TauLeaping

        family = self.process.family
        if family not in ("edit", "editflow"):
            raise DiffLMError(f"revise needs an edit-family model (process.type edit or editflow); this one is "
                              f"{family}")
        if reads_source(self.model):
            raise DiffLMError("this edit model reads its source through an encoder and writes the target from random "
                              "tokens or a draft: use difflm generate RUN --source TEXT [--bootstrap-from AR_RUN]")
        if not text.strip():
            raise DiffLMError("nothing to revise: give a non-empty --text")
        ids = self.encode_text(text)
        self._check_length(len(ids) + 1, self.seq_len, "text")
        if beam is not None and (len(beam) != 2 or min(beam) < 1):
            raise DiffLMError(f"--beam takes b,r with both at least 1, got {','.join(map(str, beam))}")
        if family == "editflow" and (beam is not None or greedy):
            raise DiffLMError("--beam and --greedy are DiffusER's; an Edit Flows model revises by τ-leaping "
                              "(drop them, or use --seed)")
        if family == "edit":
            opts = {"bootstrap": "draft", "greedy": greedy is not False}
            if beam is not None:
                opts |= {"beam_b": beam[0], "beam_r": beam[1]}
            smp = DiffuserSampler(**opts)
        else:
            smp = TauLeaping(bootstrap="draft")
        steps = self.run.sample.steps if steps is None else steps
        if steps < 1:
            raise DiffLMError(f"--steps must be at least 1, got {steps}")
        cond = Conditioning.prefix([ids], self.seq_len, fill=self.tokenizer.pad_id)
        self._check_start(smp, cond)
        with autocast(self.device, bf16):
            out = smp(self.model, self.process, Conditioning(cond.tokens.to(self.device), cond.fixed.to(self.device)),
                      steps=steps, seed=seed, temperature=self.run.sample.temperature if temperature is None
                      else temperature, top_p=self.run.sample.top_p if top_p is None else top_p)
        tok = self.tokenizer
        revisions = []
        for rev in smp.history[0]:
            ops = [{**o, **({"token": tok.decode([o["token"]])} if "token" in o else {})} for o in rev.ops]
            revisions.append({"step": rev.step, "ops": ops, "text": tok.decode(rev.text_ids)})
        final = self.process.sequences(out.tokens[:1].cpu())[0]  # the sequence before its [EOS], in any data mode
        result = {"text": tok.decode(final), "revisions": revisions, "nfe": int(out.nfe[0])}
        if beam is not None:
            result["score"] = smp.scores[0]
        return result

    def infill(
        self, text: str, *, span_tokens: int = 4, steps: int | None = None, sampler: str | None = None,
        seed: int = 0, temperature: float | None = None, top_p: float | None = None, num: int = 1,
        candidates: int = 1, bf16: bool = True, on_step: OnStep | None = None, sampler_options: dict | None = None,
    ) -> list[str]:
        """Fill each ``[MASK]`` (one token) and ``___`` (``span_tokens`` tokens) in ``text``; everything
        else is returned byte-for-byte. Returns ``num`` filled versions.

        ``candidates`` > 1: each version is the most likely of that many fills under the model's own likelihood
        of the whole text, gaps and the text after them (``text_nats``: exact for AR and for clean-causal models
        read left to right, else the bound). Samplers that read only the left context (AR, block, clean-causal)
        then still answer to the right context: sample-and-rerank infilling."""
        job = self.prepare_infill(text, span_tokens=span_tokens, steps=steps, sampler=sampler, seed=seed,
                                  temperature=temperature, top_p=top_p, num=num, candidates=candidates,
                                  sampler_options=sampler_options)
        return self._sample_job(job, batch_size=16, bf16=bf16, on_step=on_step)

    def prepare_infill(
        self, text: str, *, span_tokens: int = 4, steps: int | None = None, sampler: str | None = None,
        seed: int = 0, temperature: float | None = None, top_p: float | None = None, num: int = 1,
        candidates: int = 1, sampler_options: dict | None = None,
    ) -> Job:
        """``infill``'s rows as a Job (its answer the list of filled texts), for ``run_jobs``: ``num`` ×
        ``candidates`` rows, version i's candidates in rows i·candidates … (i+1)·candidates − 1."""
        parts = GAP.split(text)
        gaps = GAP.findall(text)
        if not gaps:
            raise DiffLMError('nothing to fill: mark gaps with [MASK] (one token) or ___ (a span)')
        if span_tokens < 1:
            raise DiffLMError("--span-tokens must be at least 1")
        ids: list[int] = []
        fixed: list[bool] = []
        spans: list[tuple[int, int]] = []
        for i, part in enumerate(parts):
            seg = self.encode_text(part)
            ids += seg
            fixed += [True] * len(seg)
            if i < len(gaps):
                n = 1 if gaps[i] == "[MASK]" else span_tokens
                spans.append((len(ids), len(ids) + n))
                ids += [self.tokenizer.mask_id] * n
                fixed += [False] * n
        self._check_length(len(ids), self.seq_len, "text with its gaps")
        row, frow = self._layout(ids, fixed, self.seq_len)
        if num < 1:
            raise DiffLMError(f"--num must be at least 1, got {num}")
        if candidates < 1:
            raise DiffLMError(f"--candidates must be at least 1, got {candidates}")
        if candidates > 1 and self.run.data.mode == "pairs":
            raise DiffLMError("--candidates ranks whole texts; this seq2seq model cannot score one: leave it at 1")
        cond = Conditioning(torch.tensor([row] * num * candidates), torch.tensor([frow] * num * candidates))
        n_text = len(ids)

        def finish(toks: torch.Tensor, nfe: torch.Tensor) -> list[str]:
            if candidates > 1:  # keep each version's most likely candidate
                nats = self.text_nats([r[:n_text].tolist() for r in toks]).view(num, candidates)
                toks = toks.view(num, candidates, -1)[torch.arange(num), nats.argmin(-1)]
            outs = []
            for r in toks:
                pieces = []
                for i, part in enumerate(parts):
                    pieces.append(part)  # the user's text, verbatim
                    if i < len(spans):
                        a, b = spans[i]
                        pieces.append(self.tokenizer.decode(r[a:b].tolist()))
                outs.append("".join(pieces))
            return outs

        return Job(cond, finish, sampler, sampler_options, steps, seed, temperature, top_p)

    def generate_targets(
        self, sources: list[str], *, candidates: int = 1, mbr: bool = True, steps: int | None = None,
        sampler: str | None = None, seed: int = 0, temperature: float | None = None, top_p: float | None = None,
        batch_size: int = 16, bf16: bool = True, on_step: OnStep | None = None, sampler_options: dict | None = None,
        guidance: float = 0.0, draft_from: DiffusionLM | str | None = None, length_beam: int = 3,
        truncate: bool = False,
    ) -> list[Transduction]:
        """Seq2seq: for each source draw ``candidates`` targets (the source is held fixed, the target region
        is generated and ends at its first [EOS]); with ``mbr`` the prediction is the candidate of highest
        BLEU against the others (minimum Bayes risk), else the first. ``guidance`` w ≠ 0: classifier-free
        guidance, for models trained with ``train.cond_dropout`` > 0. ``draft_from``: an edit model starts from
        another seq2seq model's translations (an AR model's greedy ones: DiffusER's AR bootstrap) instead of the
        sources; a masked model refines them by Mask-Predict from iteration ``start`` (a sampler option, default half
        the steps; a model that predicts the length keeps the draft's). ``draft_from="source"``: the draft is the
        source itself (a revision task whose target keeps most of its source, e.g. KJV → WEB). Models that predict
        the target length (data.target_length predicted) decode the ``length_beam`` most probable lengths, each
        ``candidates`` times, and keep the row of lowest bound on −log p(target, length | source) (Mask-Predict's
        length beam, scored by the model's own bound). A source longer than an encoder-decoder reads (half of
        data.seq_len) is an error unless ``truncate``: then it keeps its first tokens, as training did (single-stream
        models always do, with a note)."""
        self.require_seq2seq()
        if draft_from is not None:
            self._draft_decoder(sampler, steps, sampler_options)  # this model can start from a draft
            if isinstance(draft_from, str):
                if draft_from != "source":
                    raise DiffLMError(f"draft_from {draft_from!r}: give a seq2seq model or 'source'")
                drafts = list(sources)
            else:
                drafts = [o.prediction for o in draft_from.generate_targets(
                    sources, batch_size=batch_size, bf16=bf16, truncate=truncate, **draft_from.draft_decoding())]
        if draft_from is not None and (not self.process.revises_source or reads_source(self.model)):
            # the draft in the target region: a masked model refines it by Mask-Predict, an edit encoder-decoder
            # revises it while its encoder reads the source
            sampler, steps, sampler_options = self._draft_decoder(sampler, steps, sampler_options)
            job = self.prepare_targets(sources, candidates=candidates, mbr=mbr, steps=steps, sampler=sampler,
                                       seed=seed, temperature=temperature, top_p=top_p,
                                       sampler_options=sampler_options, guidance=guidance, truncate=truncate,
                                       drafts=drafts)
            return self._sample_job(job, batch_size=batch_size, bf16=bf16, on_step=on_step)
        if draft_from is not None:  # a single-stream edit model revises the drafts as its sources
            outs = self.generate_targets(drafts, candidates=candidates, mbr=mbr, steps=steps, sampler=sampler,
                                         seed=seed, temperature=temperature, top_p=top_p, batch_size=batch_size,
                                         bf16=bf16, on_step=on_step, sampler_options=sampler_options)
            return [Transduction(src, o.prediction, o.candidates, o.nfe) for src, o in zip(sources, outs)]
        job = self.prepare_targets(sources, candidates=candidates, mbr=mbr, steps=steps, sampler=sampler, seed=seed,
                                   temperature=temperature, top_p=top_p, sampler_options=sampler_options,
                                   guidance=guidance, length_beam=length_beam, truncate=truncate)
        return self._sample_job(job, batch_size=batch_size, bf16=bf16, on_step=on_step)

    def draft_decoding(self) -> dict:
        """How this model writes a draft for another to start from (``draft_from``): an AR model its greedy
        decoding (DiffusER's AR bootstrap starts from the AR model's output, not a sample of it), any other family
        its configured sampler."""
        return {"sampler_options": {"greedy": True}} if self.process.family == "autoregressive" else {}

    def _draft_decoder(self, sampler: str | None, steps: int | None,
                       sampler_options: dict | None) -> tuple[str | None, int | None, dict | None]:
        """(sampler, steps, options) that start from a draft in the free positions: an edit model revises it with its
        own sampler, a masked model refines it by Mask-Predict from iteration ``start`` (default half the steps);
        any other family is an error."""
        if self.process.revises_source:
            return sampler, steps, sampler_options
        if self.process.family != "masked":
            raise DiffLMError("--bootstrap-from needs an edit-family model, which revises a draft, or a masked one, "
                              "which refines it by Mask-Predict")
        if (sampler or "mask-predict") != "mask-predict":
            raise DiffLMError(f"a masked model refines a draft with --sampler mask-predict, not {sampler}")
        steps = steps if steps is not None else self.run.sample.steps
        return "mask-predict", steps, {"start": max(1, steps // 2)} | (sampler_options or {})

    def prepare_targets(
        self, sources: list[str], *, candidates: int = 1, mbr: bool = True, steps: int | None = None,
        sampler: str | None = None, seed: int = 0, temperature: float | None = None, top_p: float | None = None,
        sampler_options: dict | None = None, guidance: float = 0.0, length_beam: int = 3, truncate: bool = False,
        drafts: list[str] | None = None,
    ) -> Job:
        """``generate_targets``'s rows as a Job (its answer a list of ``Transduction``), for ``run_jobs``. ``drafts``:
        one text per source placed in the free target positions (and, for a model that predicts the length, giving
        it), for a sampler that starts from them (Mask-Predict's ``start``)."""
        from .evaluation.text_metrics import mbr_select

        self.require_seq2seq()
        if candidates < 1 or length_beam < 1:
            raise DiffLMError("--candidates and --length-beam must be at least 1")
        L, tok = self.seq_len, self.tokenizer
        predicted = self.run.data.target_length == "predicted"
        encoded, cut = [], 0
        encoder = reads_source(self.model)
        for k, src in enumerate(sources):
            ids = tok.encode(src.replace("\n", " "))
            if len(ids) > L // 2 and encoder and not truncate:
                raise DiffLMError(f"source {k + 1} is {len(ids)} tokens but this model's encoder reads at most "
                                  f"{L // 2} (data.seq_len={L} holds source and target): shorten it, or pass "
                                  "--truncate to keep its first tokens as training did")
            if len(ids) > L // 2:  # as in training (datasets.pair_row): the source keeps its first L // 2 tokens
                ids, cut = ids[: L // 2], cut + 1
            encoded.append(ids)
        if cut:
            print(f"difflm: note: {cut} source(s) longer than {L // 2} tokens were cut to their first {L // 2}, as "
                  f"training cut them (data.seq_len={L} holds source and target)", file=sys.stderr)
        if drafts is not None and len(drafts) != len(sources):
            raise DiffLMError(f"{len(drafts)} drafts for {len(sources)} sources: give one draft per source")
        draft_ids = [tok.encode(d.replace("\n", " ")) for d in drafts] if drafts is not None else None
        if draft_ids is not None:
            lengths = [[min(max(len(d), 1), L - len(ids) - 1)] if predicted else [None]
                       for ids, d in zip(encoded, draft_ids)]
        else:
            lengths = self._length_beam(encoded, length_beam) if predicted else [[None] for _ in encoded]
        rows, fixed, starts, owner = [], [], [], []
        for i, (ids, lens) in enumerate(zip(encoded, lengths)):
            room = L - len(ids) - 1
            for n in lens:  # the target's length: free (None, the model places [EOS]) or predicted and given
                free = room if n is None else n
                if draft_ids is not None:  # the draft, then [EOS]
                    body = (draft_ids[i] + [tok.eos_id] * room)[:free]
                else:
                    body = [tok.mask_id] * free
                for _ in range(candidates):
                    rows.append([*ids, tok.bos_id] + body + [tok.eos_id] * (room - free))
                    fixed.append([True] * (len(ids) + 1) + [False] * free + [True] * (room - free))
                    starts.append(len(ids) + 1)
                    owner.append(i)
        cond = Conditioning(torch.tensor(rows, dtype=torch.long), torch.tensor(fixed))

        def finish(toks: torch.Tensor, nfe: torch.Tensor) -> list[Transduction]:
            # an edit model returns the source revised, every other the target after the [BOS]
            revised = self.process.revises_source
            texts = [self._decode_target(r if revised else r[a:]) for r, a in zip(toks.tolist(), starts)]
            bound = self._target_bound(toks) if predicted else None
            out = []
            for i, src in enumerate(sources):
                mine = [j for j, o in enumerate(owner) if o == i]
                cands = [texts[j] for j in mine]
                if bound is not None:  # Mask-Predict: the length hypothesis (and sample) the model scores best
                    pick = min(range(len(mine)), key=lambda k: float(bound[mine[k]]))
                else:
                    pick = mbr_select(cands) if mbr and candidates > 1 else 0
                out.append(Transduction(src, cands[pick], cands, float(nfe[mine].float().mean())))
            return out

        return Job(cond, finish, sampler, sampler_options, steps, seed, temperature, top_p, guidance)

    def caption(
        self, images: list, *, candidates: int = 1, mbr: bool = True, steps: int | None = None,
        sampler: str | None = None, seed: int = 0, temperature: float | None = None, top_p: float | None = None,
        batch_size: int = 16, bf16: bool = True, on_step: OnStep | None = None, sampler_options: dict | None = None,
        guidance: float = 0.0, draft_from: DiffusionLM | None = None,
    ) -> list[Caption]:
        """Captioners (data.corpus scenes): ``candidates`` captions of each image — a path (.png, .npy), an (H, W)
        uint8 array or a float tensor in [0, 1] — with any sampler of the family; with ``mbr`` the prediction is
        the candidate of highest BLEU against the others, else the first. ``guidance`` w ≠ 0: classifier-free
        guidance on the image (models trained with ``train.cond_dropout`` > 0; w = −1 ignores the image).
        ``draft_from``: another captioner (the AR one) writes a draft of each caption (AR: greedily), which an edit
        model revises and a masked one refines by Mask-Predict from iteration ``start`` (DiffusER's AR bootstrap,
        §3.3)."""
        drafts = None
        if draft_from is not None:
            sampler, steps, sampler_options = self._draft_decoder(sampler, steps, sampler_options)
            drafts = [c.prediction for c in draft_from.caption(images, batch_size=batch_size, bf16=bf16,
                                                               **draft_from.draft_decoding())]
        job = self.prepare_captions(images, candidates=candidates, mbr=mbr, steps=steps, sampler=sampler, seed=seed,
                                    temperature=temperature, top_p=top_p, sampler_options=sampler_options,
                                    guidance=guidance, drafts=drafts)
        return self._sample_job(job, batch_size=batch_size, bf16=bf16, on_step=on_step)

    def prepare_captions(
        self, images: list, *, candidates: int = 1, mbr: bool = True, steps: int | None = None,
        sampler: str | None = None, seed: int = 0, temperature: float | None = None, top_p: float | None = None,
        sampler_options: dict | None = None, guidance: float = 0.0, drafts: list[str] | None = None,
    ) -> Job:
        """``caption``'s rows as a Job (its answer a list of ``Caption``), for ``run_jobs``. ``drafts``: one caption
        per image placed in the free positions (and, for a model that predicts the length, giving it), for a
        sampler that starts from them."""
        from .data.datasets import image_tensor
        from .data.images import as_uint8, load_image
        from .evaluation.text_metrics import mbr_select

        if self.run.data.corpus != "scenes":
            raise DiffLMError("this model was not trained to caption images (data.corpus scenes): train a captions "
                              "preset, e.g. difflm train captions-mdlm")
        if candidates < 1:
            raise DiffLMError("--candidates must be at least 1")
        size = self.model.cfg.image_size
        names, arrays = [], []
        for k, im in enumerate(images):
            if isinstance(im, (str, Path)):
                names.append(str(im))
                arr = load_image(im)
            else:
                names.append(f"image {k + 1}")
                arr = im.squeeze().cpu().numpy() if isinstance(im, torch.Tensor) else np.squeeze(np.asarray(im))
                arr = as_uint8(arr)
            if arr.shape != (size, size):
                raise DiffLMError(f"{names[-1]} is {'×'.join(map(str, arr.shape))} pixels but this model reads "
                                  f"{size}×{size} grayscale images: resize it")
            arrays.append(arr)
        if not arrays:
            raise DiffLMError("give at least one image to caption")
        L, tok = self.seq_len, self.tokenizer
        predicted = self.run.data.target_length == "predicted"
        pixels = image_tensor(np.stack(arrays))
        if drafts is not None and len(drafts) != len(arrays):
            raise DiffLMError(f"{len(drafts)} drafts for {len(arrays)} images: give one draft per image")
        draft_ids = None if drafts is None else [tok.encode(d.replace("\n", " "))[: L - 1] for d in drafts]
        if draft_ids is not None and predicted:  # the draft gives the length
            lengths = [max(len(d), 1) for d in draft_ids]
        elif predicted:  # Mask-Predict's length: the most probable one under the image's length predictor
            x = torch.tensor([[tok.bos_id] + [tok.eos_id] * (L - 1)] * len(arrays))
            with torch.no_grad():
                reader = bind_source(self.model, self.process, x.to(self.device), pixels.to(self.device))
                logp = reader.length_log_probs().cpu()[:, : L]
            logp[:, 0] = -math.inf
            lengths = logp.argmax(-1).tolist()
        else:
            lengths = [L - 1] * len(arrays)
        rows, fixed, owner = [], [], []
        for i, n in enumerate(lengths):
            body = [tok.mask_id] * n if draft_ids is None else (draft_ids[i] + [tok.eos_id] * L)[:n]
            for _ in range(candidates):
                rows.append([tok.bos_id] + body + [tok.eos_id] * (L - 1 - n))
                fixed.append([True] + [False] * n + [True] * (L - 1 - n) if predicted else [True] + [False] * (L - 1))
                owner.append(i)
        cond = Conditioning(torch.tensor(rows, dtype=torch.long), torch.tensor(fixed), pixels[owner])

        def finish(toks: torch.Tensor, nfe: torch.Tensor) -> list[Caption]:
            skip = 0 if getattr(self.process, "packs_target", False) else 1  # after the [BOS], or packed from 0
            texts = [self._decode_target(r[skip:]) for r in toks.tolist()]
            out = []
            for i, name in enumerate(names):
                mine = [j for j, o in enumerate(owner) if o == i]
                cands = [texts[j] for j in mine]
                pick = mbr_select(cands) if mbr and candidates > 1 else 0
                out.append(Caption(name, cands[pick], cands, float(nfe[mine].float().mean())))
            return out

        return Job(cond, finish, sampler, sampler_options, steps, seed, temperature, top_p, guidance)

    @torch.no_grad()
    def _length_beam(self, sources: list[list[int]], k: int) -> list[list[int]]:
        """The k most probable target lengths for each source (ids), under the encoder's length predictor, among
        the lengths its row has room for (at least one token)."""
        from .models.seq2seq import SourceReader

        L, tok = self.seq_len, self.tokenizer
        x = torch.tensor([[*ids, tok.bos_id] + [tok.eos_id] * (L - len(ids) - 1) for ids in sources])
        reader = SourceReader.for_rows(self.model, x.to(self.device), tok.bos_id)
        logp = reader.length_log_probs().cpu()
        out = []
        for ids, lp in zip(sources, logp):
            room = L - len(ids) - 1
            lp = lp[: room + 1].clone()
            lp[0] = -math.inf  # an empty target is no translation
            out.append(lp.topk(min(k, room)).indices.tolist())
        return out

    @torch.no_grad()
    def _target_bound(self, toks: torch.Tensor, draws: int = 4) -> torch.Tensor:
        """The model's bound on −log p(target, length | source) of sampled pairs rows (N, L) (the length term and
        a mean over ``draws`` fixed time draws): the score Mask-Predict's length beam picks by. (N,)"""
        tok = self.tokenizer
        batch = make_batch(toks.to(self.device), tok.pad_id, tok.eos_id, "pairs", tok.bos_id, fill_given=True)
        net = bind_source(self.model, self.process, batch.tokens, batch.images)  # sources encoded once for all draws
        gen = torch.Generator(device=self.device).manual_seed(0)
        draws = 1 if self.process.exact_likelihood else draws
        return sum(self.process.nelbo(net, batch, generator=gen).cpu() for _ in range(draws)) / draws

    def evaluate(self, split: str = "valid", *, samples: int = 4, batch_size: int = 32, seed: int = 0,
                 max_batches: int | None = None, bf16: bool = True, progress: bool = False,
                 all_steps: bool = False, left_to_right: bool = False) -> EvalResult:
        """The bound (exact NLL for autoregressive) on the run's ``split`` (valid or test), on the device the
        model lives on: NELBO ± a 95% interval over ``samples`` independent time draws, perplexity, and bits
        per character for character-level tokenizers (``evaluation.likelihood.evaluate``). ``left_to_right``: a
        clean-causal masked model's exact NLL under left-to-right decoding one token a call, instead of the bound."""
        from .data import build_dataset

        data = build_dataset(self.run.data, self.tokenizer, split)
        return evaluate(self.model, self.process, data, n_samples=samples, batch_size=batch_size, seed=seed,
                        max_batches=max_batches, bf16=bf16, char_level=self.tokenizer.kind == "char",
                        device=self.device, progress=progress, all_steps=all_steps, left_to_right=left_to_right)

    def _score_batch(self, ids: list[int]) -> Batch:
        """One text's ids as the (1, L') row its score reads: a lines-mode model's padded row, or a packed model's
        text and [EOS] as a short row; for block models the row is topped up to whole blocks with [MASK]s that are
        never modelled (no earlier block reads them)."""
        tok = self.tokenizer
        self._check_length(len(ids) + 1, self.seq_len, "text")
        row, _ = self._layout(ids, [True] * len(ids), self.seq_len)
        if self.run.data.mode != "lines":
            row = [*ids, tok.eos_id]
        batch = make_batch(torch.tensor([row], device=self.device), tok.pad_id, tok.eos_id, self.run.data.mode)
        bs = getattr(self.process, "block_size", 1)
        if len(row) % bs:
            top = bs - len(row) % bs
            batch = Batch(F.pad(batch.tokens, (0, top), value=tok.mask_id), F.pad(batch.loss_mask, (0, top)),
                          F.pad(batch.fixed, (0, top)))
        return batch

    def _left_to_right_exact(self) -> bool:
        """True when the model's exact left-to-right likelihood is defined (a time-free clean-causal model)."""
        if not hasattr(self.process, "left_to_right_nll"):
            return False
        try:
            self.process.check_left_to_right(self.model)
        except DiffLMError:
            return False
        return True

    def _nats(self, batch: Batch, j: int, *, n_samples: int, seed: int, bf16: bool, left_to_right: bool) -> float:
        """−log p of one text's ``_score_batch`` (the ``j``-th of a call, keying its time draws), in nats."""
        K = 1 if self.process.exact_likelihood or left_to_right else n_samples
        xs = Batch(batch.tokens.expand(K, -1), batch.loss_mask.expand(K, -1), batch.fixed.expand(K, -1))
        xs.u = low_discrepancy_uniform(float(uniform(seed, torch.tensor([j]), 0, 1)[0, 0]), K).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed + j)
        with autocast(self.device, bf16):
            nats = self.process.left_to_right_nll(self.model, xs) if left_to_right else \
                self.process.nelbo(self.model, xs, generator=gen)
        return float(nats.double().mean())

    def _check_scorable(self) -> None:
        if self.run.data.mode == "pairs":
            raise DiffLMError("this is a seq2seq model: measure it with difflm eval (its bound over target tokens)")

    @torch.no_grad()
    def text_nats(self, texts: list[list[int]], *, n_samples: int = 16, seed: int = 0, bf16: bool = False) -> Tensor:
        """−log p of each token-id text, in nats (N,) float64: exact for AR, the exact left-to-right likelihood for
        a time-free clean-causal model (``MaskedDiffusion.left_to_right_terms``), else the negative ELBO averaged
        over ``n_samples`` low-discrepancy time draws keyed on ``seed``, the same draws for every text (common
        random numbers: texts are ranked by their difference, not by draw noise)."""
        self._check_scorable()
        l2r = self._left_to_right_exact()
        return torch.tensor([self._nats(self._score_batch(ids), 0, n_samples=n_samples, seed=seed, bf16=bf16,
                                        left_to_right=l2r) for ids in texts], dtype=torch.float64)

    @torch.no_grad()
    def score(self, texts: list[str], *, n_samples: int = 16, seed: int = 0, bf16: bool = False) -> list[dict]:
        """Negative ELBO (exact NLL for autoregressive) of each text in nats, averaged over n_samples
        time draws: [{"nats": ..., "tokens": n, "nats_per_token": ...}]."""
        self._check_scorable()
        out = []
        for j, text in enumerate(texts):
            batch = self._score_batch(self.encode_text(text))
            nats = self._nats(batch, j, n_samples=n_samples, seed=seed, bf16=bf16, left_to_right=False)
            n = int(batch.loss_mask.sum())
            out.append({"nats": nats, "tokens": n, "nats_per_token": nats / n, "ppl": math.exp(nats / n)})
        return out
