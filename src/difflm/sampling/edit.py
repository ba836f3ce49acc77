"""DiffusER's reverse process (Reid et al. 2022, §3.2): ``steps`` revisions, each a tagger call (which tokens to
keep, delete or replace, and how many to insert in each gap) and a generator call (the new tokens), starting from
a bootstrap (§3.3): the empty sequence, random tokens, or a given draft (the tokens of ``cond`` marked fixed).

Tags and tokens are drawn with the counter-based RNG (keyed on seed, row and revision), so a row's revisions do
not depend on the batch; ``greedy`` takes the most probable tag and token instead. A row whose tags change nothing
stops (no more network calls). ``history`` records every revision's operations with positions (``difflm revise
--json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..diffusion.edit import N_OPS, EditDiffusion
from ..diffusion.edits import DELETE, KEEP, OPS, REPLACE
from ..errors import DiffLMError
from ..models.seq2seq import reads_source
from ..registry import option, register_sampler
from ..rng import seed_rows, uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo, on_rows
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning


@dataclass
class DiffuserOptions:
    bootstrap: Literal["default", "empty", "random", "draft"] = option(
        "default", "the start: default (a given draft if any, else process.bootstrap), empty, random tokens, draft")
    greedy: bool = option(False, "take the most probable tags and tokens (else sample them)")
    beam_b: int = option(0, "2D beam search (DiffusER §3.4): tag hypotheses kept within a revision (0: off)", ge=0)
    beam_r: int = option(1, "2D beam search: revision trajectories kept across steps", ge=1)
    keep_bias: float = option(0.0, "added to the log-probability of KEEP and of inserting nothing before tags are "
                              "drawn (GECToR's confidence bias): > 0 edits only where the tagger is surer; beam "
                              "search scores stay unbiased")


def resolve_start(kind: str, process, cond: Conditioning, encoder: bool = False) -> tuple[str, list[list[int]]]:
    """(the start's kind, each row's start): ``default`` becomes "draft" when the rows hold fixed tokens, else the
    process's ``default_start()``; a draft is a row's fixed tokens (layout ids left out), "empty" an empty list,
    "random" leaves the drawing to the sampler (its rows are returned empty). For an ``encoder``-decoder the
    source (before the row's [BOS]) is the encoder's: a draft is what the target region holds ([MASK] left out)."""
    given = (process.bos_id, process.pad_id, process.eos_id)  # a seq2seq row's separator is layout
    if encoder:
        drafts = []
        for r in cond.tokens.tolist():
            tgt = r[r.index(process.bos_id) + 1:] if process.bos_id in r else r
            drafts.append([t for t in tgt if t not in (*given, process.mask_id)])
    else:
        drafts = [[t for t, f in zip(r, fx) if f and t not in given]
                  for r, fx in zip(cond.tokens.tolist(), cond.fixed.tolist())]
    if kind == "default":
        kind = "draft" if any(drafts) else process.default_start()
    if kind == "draft":
        if not any(drafts):
            raise DiffLMError("the draft bootstrap needs a text to revise")
        return kind, drafts
    return kind, [[] for _ in drafts]


@dataclass
class Revision:
    """One revision of one row: the operations with their positions in the sequence it edited."""

    step: int
    ops: list[dict] = field(default_factory=list)  # {"op": "DELETE"|"REPLACE"|"INSERT", "at": i, "token"(s)}
    text_ids: list[int] = field(default_factory=list)


@register_sampler
class DiffuserSampler(Sampler):
    name = "diffuser"
    families = ("edit",)
    Options = DiffuserOptions
    bench = ({}, {"greedy": True})

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.history: list[list[Revision]] = []

    def start(self, process: EditDiffusion, cond: Conditioning, rows: Tensor, seed: int,
              encoder: bool = False) -> list[list[int]]:
        """Each row's x_T."""
        kind, drafts = resolve_start(self.options.bootstrap, process, cond, encoder)
        if kind != "random":
            return drafts
        L = cond.shape[1]
        u = uniform(seed, rows, 0, L // 2, stream=41)  # random tokens: half the row, uniform over data tokens
        ids = torch.tensor(process.data_ids)
        return [ids[(r * len(ids)).long().clamp(max=len(ids) - 1)].tolist() for r in u]

    def _draw(self, logits: Tensor, u: Tensor, temperature: float, top_p: float) -> Tensor:
        if self.options.greedy:
            return logits.argmax(-1)
        return sample_categorical(probs_from_logits(logits, temperature, top_p), u)

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: EditDiffusion, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0, on_step: OnStep | None = None,
    ) -> SampleOutput:
        rows = self.default_rows(cond, rows, steps)
        B, L = cond.shape
        dev = cond.tokens.device
        seqs = self.start(process, cond, rows, seed, reads_source(model))
        seqs = [s[: L - 1] for s in seqs]
        if self.options.beam_b > 0:
            return self._beam(model, process, seqs, steps, L, dev, on_step)
        nfe = torch.zeros(B, dtype=torch.long, device=dev)
        live = torch.ones(B, dtype=torch.bool, device=dev)
        self.history = [[] for _ in range(B)]
        for k in range(steps, 0, -1):
            idx = live.nonzero().squeeze(-1)
            if len(idx) == 0:
                break
            xt = process.net_input([seqs[i] for i in idx.tolist()], L, dev)
            W = xt.shape[1]  # the network's width (≤ L: cut to the longest row when padding is masked)
            t = process.step_time(k, steps)
            op_l, ins_l = process.tag_logits(on_rows(model, idx), xt, t)
            if self.options.keep_bias:
                op_l[..., KEEP] += self.options.keep_bias
                ins_l[..., 0] += self.options.keep_bias
            r, s = rows[idx], seed_rows(seed, idx)
            ops = self._draw(op_l, uniform(s, r, k, L, stream=42)[:, :W], temperature, 1.0)
            ins = self._draw(ins_l, uniform(s, r, k, L, stream=43)[:, :W], temperature, 1.0)
            nfe[idx] += 1
            ys, slots, marks, gen_rows = [], [], [], []
            for j, i in enumerate(idx.tolist()):
                n = len(seqs[i])
                o, c = ops[j, :n].tolist(), ins[j, : n + 1].tolist()
                if self._changes_nothing(o, c):
                    live[i] = False  # nothing to change: this row is done
                    continue
                y, slot, mk = process.apply_tags(seqs[i], o, c, L)
                self.history[i].append(self._revision(k, seqs[i], o, c))
                ys.append(y), slots.append(slot), marks.append(mk), gen_rows.append((j, i))
            if gen_rows:
                gi = torch.tensor([i for _, i in gen_rows], device=dev)
                y = process.net_input(ys, L, dev)
                sel = self._slots(slots, y.shape[1], dev)
                mk = process.pack_marks(marks, y.shape[1], dev)
                logits = process.gen_logits(on_rows(model, gi), y, t, sel, select=sel, marks=mk)  # (N slots, V)
                u = uniform(seed_rows(seed, gi), rows[gi], k, L, stream=44)[:, : y.shape[1]].to(dev)
                toks = y.clone()
                toks[sel] = self._draw(logits, u[sel], temperature, top_p)
                nfe[gi] += 1
                fixed = self.options.greedy and not process.options.time_conditioning
                for g, (_, i) in enumerate(gen_rows):
                    filled = process.revised(toks[g, : len(ys[g])].tolist(), marks[g])  # y with its slots filled
                    if fixed and filled == seqs[i]:  # argmax of a time-free network repeats this revision
                        live[i] = False  # (a REPLACE writing its old token, align: whole-words): a fixed point
                    seqs[i] = filled
                    self.history[i][-1].text_ids = filled
            if on_step is not None:
                on_step(StepInfo(k, steps, k / steps, (k - 1) / steps, process.pack(seqs, L, dev), nfe.clone()))
        return SampleOutput(process.pack(seqs, L, dev), nfe)

    # -- 2D beam search ------------------------------------------------------------------------------
    def _beam(self, model, process: EditDiffusion, seqs: list[list[int]], steps: int, L: int, dev,
              on_step: OnStep | None) -> SampleOutput:
        """Per row, beam r over revision trajectories and, inside each revision, beam b over tag assignments,
        every hypothesis scored by log p_tag + log p_gen of its greedy tokens, summed over revisions; the best
        trajectory wins. A trajectory whose revision changes nothing (every tag KEEP, no insertion) is finished, as a
        greedy row stops: it is carried on at its score without more calls. b = r = 1 is greedy decoding."""
        out, nfe, self.scores = [], torch.zeros(len(seqs), dtype=torch.long, device=dev), []
        self.history = []
        for i, x in enumerate(seqs):
            beams, done = [(0.0, x, [])], []  # done: finished trajectories (score, sequence, history)
            for k in range(steps, 0, -1):
                if not beams:
                    break
                xt = process.net_input([b[1] for b in beams], L, dev)
                t = process.step_time(k, steps)
                op_l, ins_l = process.tag_logits(on_rows(model, torch.full((len(beams),), i, device=dev)), xt, t)
                op_l, ins_l = op_l.log_softmax(-1), ins_l.log_softmax(-1)
                nfe[i] += 1
                cands = []  # (score, x_t, ops, ins, tag log-prob, trajectory)
                finished = []
                for j, (score, seq, hist) in enumerate(beams):
                    for lp, o, c in self._top_tags(op_l[j], ins_l[j], len(seq), self.options.beam_b):
                        if self._changes_nothing(o, c):  # this trajectory ends here
                            rev = self._revision(k, seq, o, c)
                            rev.text_ids = list(seq)
                            finished.append((score + lp, seq, [*hist, rev]))
                        else:
                            cands.append((score, seq, o, c, lp, hist))
                if not cands:  # every trajectory ended: the r best of all ended ones remain
                    beams, done = [], sorted(done + finished, key=lambda z: -z[0])[: self.options.beam_r]
                    break
                ys = [process.apply_tags(seq, o, c, L) for _, seq, o, c, _, _ in cands]
                y_in = process.net_input([y for y, _, _ in ys], L, dev)
                sel = self._slots([sl for _, sl, _ in ys], y_in.shape[1], dev)
                mk = process.pack_marks([m for _, _, m in ys], y_in.shape[1], dev)
                logits = process.gen_logits(on_rows(model, torch.full((len(ys),), i, device=dev)), y_in, t, sel,
                                            select=sel, marks=mk).log_softmax(-1)  # (N slots, V), by candidate
                per_cand = logits.split(sel.sum(1).tolist())
                nfe[i] += 1
                scored = []
                for g, ((score, seq, o, c, lp, hist), (y, slot, m)) in enumerate(zip(cands, ys)):
                    pos = [p for p, sl in enumerate(slot) if sl]
                    best = per_cand[g].max(-1) if pos else None
                    new = list(y)
                    gen_lp = 0.0
                    if pos:
                        for p, t in zip(pos, best.indices.tolist()):
                            new[p] = t
                        gen_lp = float(best.values.double().sum())
                    new = process.revised(new, m)
                    rev = self._revision(k, seq, o, c)
                    rev.text_ids = new
                    scored.append((score + lp + gen_lp, new, [*hist, rev]))
                # stable sorts: ties keep the order of generation; a trajectory kept r-best among the live and the
                # finished ones stays in its kind
                pool = sorted([(z, True) for z in scored] + [(z, False) for z in done + finished],
                              key=lambda q: -q[0][0])[: self.options.beam_r]
                beams = [z for z, live in pool if live]
                done = [z for z, live in pool if not live]
            best_score, best_seq, best_hist = sorted(beams + done, key=lambda z: -z[0])[0]
            out.append(best_seq)
            self.scores.append(best_score)
            self.history.append(best_hist)
            if on_step is not None:
                on_step(StepInfo(1, steps, 1 / steps, 0.0, process.pack(out, L, dev), nfe.clone()))
        return SampleOutput(process.pack(out, L, dev), nfe)

    @staticmethod
    def _changes_nothing(ops: list[int], ins: list[int]) -> bool:
        """Whether tags keep every token and insert nothing (the revision would return its input)."""
        return all(o == KEEP for o in ops) and not any(ins)

    @staticmethod
    def _slots(slots: list[list[bool]], L: int, dev) -> Tensor:
        """Per-row slot flags as a (B, L) mask."""
        out = torch.zeros(len(slots), L, dtype=torch.bool)
        for r, sl in enumerate(slots):
            out[r, : len(sl)] = torch.tensor(sl, dtype=torch.bool)
        return out.to(dev)

    @staticmethod
    def _top_tags(op_lp: Tensor, ins_lp: Tensor, n: int, b: int) -> list[tuple[float, list[int], list[int]]]:
        """The b most probable tag assignments for a sequence of n tokens (+ its last gap at position n): a beam
        over positions of the per-position joint (op, insert count), exact for independent positions."""
        K1 = ins_lp.shape[-1]
        joint = (op_lp[:n, :, None] + ins_lp[:n, None, :]).reshape(n, 3 * K1).double()  # (n, 3·(K+1))
        beams: list[tuple[float, list[int], list[int]]] = [(0.0, [], [])]
        for p in range(n):
            top = joint[p].topk(min(b, joint.shape[1]))
            beams = sorted(((s + float(v), o + [int(c) // K1], c_ + [int(c) % K1])
                            for s, o, c_ in beams for v, c in zip(top.values, top.indices)), key=lambda z: -z[0])[:b]
        top = ins_lp[n].double().topk(min(b, K1))  # the last gap, read at [EOS]
        beams = sorted(((s + float(v), o, c_ + [int(c)]) for s, o, c_ in beams
                        for v, c in zip(top.values, top.indices)), key=lambda z: -z[0])[:b]
        return beams

    @staticmethod
    def _revision(step: int, x: list[int], ops: list[int], ins: list[int]) -> Revision:
        rev = Revision(step)
        for i in range(len(x) + 1):
            if ins[i]:
                rev.ops.append({"op": "INSERT", "at": i, "count": ins[i]})
            if i < len(x) and ops[i] in (DELETE, REPLACE):
                rev.ops.append({"op": OPS[ops[i]], "at": i, "token": x[i]})
        return rev


assert N_OPS == len(OPS)
