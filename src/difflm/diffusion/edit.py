"""Edit-based diffusion: DiffusER (Reid, Hellendoorn & Neubig 2022, arXiv 2210.16886).

Sequences have no fixed length: the forward process edits, it does not mask. Each of T steps applies random
edits to the previous sequence (§3.1): at every position a span starts with probability β_t (the schedule), its
kind drawn from E_t = (keep, replace, delete, insert) and its length from E_l = max(1, Poisson(λ)); a replaced or
inserted token is uniform over the data tokens. Keep spans change nothing, so β_t · (1 − E_t[keep]) · E[len] is
the expected fraction of tokens edited per step.

The reverse process (§3.2) undoes one step at a time with two predictions from one network:
    tagger     p_tag(e_t | x_t): per token KEEP / DELETE / REPLACE, and per gap how many tokens to insert
               (0..max_insert; the gap before token i is read at token i, the last gap at [EOS]);
    generator  p_gen(x_{t−1} | x_t, e_t): the tokens of the replaced and inserted slots, which enter as [MASK].
               It reads x_t with the tagged edits made (DiffusER; ``generator_input: edited``), or x_t whole with
               the inserted slots, each position marked kept / deleted / slot by a learned input embedding
               (``generator_input: marked``): the tokens a revision deletes stay readable, e.g. the other pieces
               of a misspelt word rewritten from its first one.
Both are trained with cross-entropy on the edit script that turns x_t back into x_{t−1}, computed by a Levenshtein
alignment (``edits.edit_script``) — any pair of sequences is a training pair. The objective is not a likelihood
bound: ``exact_likelihood`` is False and ``difflm eval`` reports it as the edit loss (nats per token of x_0).

Seq2seq (``data.mode: pairs``, DiffusER §3.3's source bootstrap): x_T is the source, x_0 the target, and the states
between lie on the Levenshtein edit path from one to the other (``path_pair``); revision starts from the source.
With an encoder-decoder network (``model.encoder_layers``, DiffusER's own translation setup) the encoder reads the
source (or the image, captioning) and the forward process corrupts the target as in the unconditional case: the
tagger and generator read x_t from position 0 and the source by cross-attention, and revision starts from random
tokens or a draft (another model's translation: AR bootstrap), never from the source itself.

Layout: a row is the sequence, then [EOS], then [PAD] (``data.mode: lines``); the tagger reads its classes off the
backbone's auxiliary head (``BackboneNeeds.aux_outputs`` = 3 + max_insert + 1), the generator off the token head.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffLMError
from ..registry import BackboneNeeds, option, register_family
from .base import Batch, Process
from .edits import (
    ALIGN_HELP,
    DELETE,
    KEEP,
    REPLACE,
    WHOLE_WORDS_HELP,
    EditScript,
    apply_script,
    atomic_edits,
    edit_script,
    partial_script,
    word_script,
)

N_OPS = 3  # KEEP, DELETE, REPLACE
# the generator's input marks (``generator_input: marked``); the tagger's input reads MARK_TAGGER everywhere
MARK_TAGGER, MARK_KEPT, MARK_DELETED, MARK_SLOT = range(N_MARKS := 4)


@dataclass
class EditOptions:
    steps: int = option(10, "T: forward edit steps (and reverse revisions)", ge=1)
    keep: float = option(0.6, "E_t: share of spans that keep their tokens", ge=0, le=1)
    replace: float = option(0.2, "E_t: share of spans replaced by random tokens", ge=0, le=1)
    delete: float = option(0.1, "E_t: share of spans deleted", ge=0, le=1)
    insert: float = option(0.1, "E_t: share of spans that insert random tokens before a position", ge=0, le=1)
    span_lambda: float = option(3.0, "E_l: span length max(1, Poisson(λ))", gt=0)
    schedule: Literal["linear", "constant"] = option("linear", "β_t: linear (β·t/T, edits grow with t) or constant")
    edit_rate: float = option(0.3, "β: the span-start probability at t = T (linear) or at every step", gt=0, le=1)
    max_insert: int = option(4, "the most tokens the tagger inserts into one gap", ge=1)
    time_conditioning: bool = option(True, "feed the step t/T to the network: an edit made at an earlier step is "
                                     "kept at this one, so a time-free tagger cannot tell which to undo now")
    target: Literal["previous", "clean"] = option("previous", "what the tagger and generator learn to reach from "
                                                  "x_t: x_{t−1} (DiffusER) or x_0 itself (every pending edit at once; "
                                                  "needs no time)")
    bootstrap: Literal["empty", "random", "draft"] = option("random", "where revision starts by default: random "
                                                             "tokens (nearest to x_T, a corrupted copy of the data), "
                                                             "the empty sequence (never seen in training), or a draft")
    replace_input: Literal["token", "mask"] = option("token", "what the generator reads at a REPLACE slot: the "
                                                     "token it replaces (a misspelling stays readable; that token is "
                                                     "then banned there, but for align: whole-words) or [MASK] (it is "
                                                     "gone)")
    align: Literal["words", "tokens", "whole-words"] = option("words", ALIGN_HELP + WHOLE_WORDS_HELP)
    generator_input: Literal["edited", "marked"] = option(
        "marked", "what the generator reads: marked (x_t whole with the inserted slots, each position marked kept / "
        "deleted / slot by a learned input embedding: the tokens a revision deletes stay readable, e.g. the rest of "
        "a misspelt word; typo WER 0.058 against 0.083) or edited (DiffusER's: x_t with the tagged edits made, "
        "deleted tokens gone; runs saved before 2026-12-06)")
    padding: Literal["masked", "attended"] = option("masked", "the [PAD] keys after a row's [EOS]: masked (no position "
                                                    "reads them, so the network runs on rows cut to the batch's "
                                                    "longest sequence, and a row's output does not depend on the "
                                                    "row length) or attended (runs saved before 2026-12-05)")


def poisson(lam: float, u: float) -> int:
    """Inverse-CDF draw from Poisson(λ) with one uniform."""
    k, p = 0, math.exp(-lam)
    c = p
    while u > c and k < 1000:
        k += 1
        p *= lam / k
        c += p
    return k


@register_family
class EditDiffusion(Process):
    family = "edit"
    Options = EditOptions
    default_sampler = "diffuser"
    exact_likelihood = False
    has_bound = False  # DiffusER's objective bounds no likelihood
    revises_source = True  # seq2seq: the output is the source revised, not a continuation after it
    generates_length = True
    packs_target = True  # the network reads x_t from position 0 (an encoder-decoder reads the source apart)

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, **kw) -> None:
        super().__init__(vocab_size, mask_id, pad_id, bos_id, **kw)
        o = self.options
        total = o.keep + o.replace + o.delete + o.insert
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise DiffLMError(f"process keep + replace + delete + insert must sum to 1, got {total:g}")
        if self.eos_id is None:
            raise DiffLMError("edit diffusion needs a tokenizer with [EOS] (it ends every sequence)")
        self.T, self.K = int(o.steps), int(o.max_insert)
        self.E = (o.keep, o.replace, o.delete, o.insert)
        self.data_ids = [i for i in range(vocab_size) if i not in set(self.never) | {self.eos_id}]

    def backbone_needs(self) -> BackboneNeeds:
        return BackboneNeeds(aux_outputs=N_OPS + self.K + 1, time_conditioning=bool(self.options.time_conditioning),
                             input_marks=N_MARKS if self.options.generator_input == "marked" else 0)

    def trained_starts(self, seq2seq: bool) -> tuple[str, ...]:
        """The bootstraps whose x_T the training states resemble: a single-stream seq2seq model only ever saw
        states on the path from a source, so it needs a draft; forward corruption (unconditional, or the target of
        an encoder-decoder, ``seq2seq`` False) ends at a corrupted copy of the data (random tokens are the nearest
        start) and never at the empty sequence, from which such a model inserts nothing."""
        return ("draft",) if seq2seq else ("random", "draft")

    def default_start(self) -> str:
        """The bootstrap of a sampler left at ``default`` when no draft is given."""
        return self.options.bootstrap

    def _t(self, t: Tensor | float | None, B: int, device) -> Tensor | None:
        """The network's time input (B,) for step t/T, or None for a time-free network."""
        if not self.options.time_conditioning or t is None:
            return None
        return torch.as_tensor(t, dtype=torch.float32, device=device).expand(B).contiguous()

    # -- forward process ---------------------------------------------------------------------------
    def beta(self, t: int) -> float:
        """β_t: the probability that a span starts at a position in step t (1..T)."""
        o = self.options
        return o.edit_rate * (t / self.T if o.schedule == "linear" else 1.0)

    def corrupt_step(self, y: list[int], t: int, rng: random.Random, log: list | None = None) -> list[int]:
        """One forward step q(x_t | x_{t−1}): random spans of keep / replace / delete / insert edits (``log``
        receives each span's (kind, length), kind 0..3 in E_t's order)."""
        out, i, beta = [], 0, self.beta(t)
        while i < len(y):
            if rng.random() >= beta:
                out.append(y[i])
                i += 1
                continue
            kind = self._kind(rng.random())
            k = max(1, poisson(self.options.span_lambda, rng.random()))
            if log is not None:
                log.append((kind, k))
            if kind == 0:  # keep
                out.extend(y[i : i + k])
                i += k
            elif kind == 1:  # replace
                out.extend(rng.choice(self.data_ids) for _ in y[i : i + k])
                i += k
            elif kind == 2:  # delete
                i += k
            else:  # insert before position i, which is then kept
                out.extend(rng.choice(self.data_ids) for _ in range(k))
                out.append(y[i])
                i += 1
        return out

    def _kind(self, u: float) -> int:
        c = 0.0
        for j, p in enumerate(self.E):
            c += p
            if u < c:
                return j
        return 3

    def corrupt_to(self, x0: list[int], t: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """(x_{t−1}, x_t) from x0 by t forward steps."""
        prev = list(x0)
        for s in range(1, t):
            prev = self.corrupt_step(prev, s, rng)
        return prev, self.corrupt_step(prev, t, rng)

    def path_pair(self, src: list[int], tgt: list[int], t: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """Seq2seq (DiffusER bootstrapped from the source, §3.3): (x_{t−1}, x_t) on the edit path from x_T = the
        source to x_0 = the target — the Levenshtein script's single edits in a random order, a share (T − t)/T
        of them made at step t."""
        edits = atomic_edits(self.script(src, tgt))
        rank = list(range(len(edits)))
        rng.shuffle(rank)
        made = [len(edits) * (self.T - s) // self.T for s in (t - 1, t)]
        prev, cur = ([r < m for r in rank] for m in made)
        return (apply_script(src, partial_script(len(src), edits, prev)),
                apply_script(src, partial_script(len(src), edits, cur)))

    def script(self, a: list[int], b: list[int]) -> EditScript:
        """The edit script training aligns ``a`` to ``b`` by (``process.align``)."""
        if self.options.align == "whole-words":
            return word_script(a, b, self.word_starts)
        return edit_script(a, b, self.aligned_by)

    def pairs_of(self, batch: Batch) -> list[tuple[list[int], list[int]]] | None:
        """(source, target) per row of a seq2seq batch (source, [BOS], target, [EOS]…), else None."""
        if self.bos_id is None or not bool((batch.tokens == self.bos_id).any(-1).all()):
            return None
        out = []
        for row in batch.tokens.tolist():
            b = row.index(self.bos_id)
            tgt = row[b + 1 :]
            out.append((row[:b], tgt[: tgt.index(self.eos_id)] if self.eos_id in tgt else tgt))
        return out

    def corrupt(self, batch: Batch, t: Tensor, generator=None) -> Tensor:
        """x_t ~ q(x_t | x0) for integer steps t (B,) in 1..T, as rows (B, L): the sequence, [EOS], [PAD]."""
        rngs = self._rngs(batch, generator)
        rows = [self.corrupt_to(x0, int(k), r)[1] for x0, k, r in zip(self.sequences(batch.tokens), t, rngs)]
        return self.pack(rows, batch.tokens.shape[1], batch.tokens.device)

    # -- layout ------------------------------------------------------------------------------------
    def sequences(self, x: Tensor) -> list[list[int]]:
        """Each row's tokens before its first [EOS] (or [PAD])."""
        out = []
        for row in x.tolist():
            seq = []
            for tok in row:
                if tok in (self.eos_id, self.pad_id):
                    break
                seq.append(tok)
            out.append(seq)
        return out

    def pack(self, seqs: list[list[int]], L: int, device=None) -> Tensor:
        """Rows (B, L): each sequence cut to L − 1 tokens, then [EOS], then [PAD]."""
        x = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            s = s[: L - 1]
            x[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            x[r, len(s)] = self.eos_id
        return x.to(device)

    def net_input(self, seqs: list[list[int]], L: int, device=None) -> Tensor:
        """The network's input rows for ``seqs``: ``pack`` at width L, or (``padding: masked``) only as wide as the
        longest sequence and its [EOS] — the [PAD] columns past it would be masked keys, so cutting them changes
        no output and saves their compute (B, ≤ L)."""
        if self.options.padding == "masked":
            L = min(L, max((len(s) for s in seqs), default=0) + 1)
        return self.pack(seqs, L, device)

    def _keys(self, x: Tensor) -> Tensor | None:
        """The attention mask (B, 1, 1, L) that hides [PAD] keys (``padding: masked``), else None."""
        return (x != self.pad_id)[:, None, None, :] if self.options.padding == "masked" else None

    def _rngs(self, batch: Batch, generator) -> list[random.Random]:
        """One Python RNG per row, seeded from the row's counter-based uniform (batch-invariant)."""
        u = batch.rand(generator, stream=7, width=2)
        return [random.Random(int(a * 2**52) ^ (int(b * 2**52) << 1)) for a, b in u.tolist()]

    # -- the two predictions -------------------------------------------------------------------------
    def tag_logits(self, model: nn.Module, xt: Tensor, t: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """(op logits (B, L, 3), insert-count logits (B, L, K + 1)) in float32; t: the step as t/T (B,)."""
        aux = model(xt, self._t(t, xt.shape[0], xt.device), attn_mask=self._keys(xt), head="aux").float()
        return aux[..., :N_OPS], aux[..., N_OPS:]

    def gen_logits(self, model: nn.Module, y: Tensor, t: Tensor | float | None = None,
                   slots: Tensor | None = None, select: Tensor | None = None, marks: Tensor | None = None) -> Tensor:
        """Token logits (B, L, V) at the generator's input y (B, L), never-data ids at −inf, or (N, V) at the N
        positions where ``select`` (B, L) is True (the output head runs only there); with ``slots`` (B, L) a REPLACE
        slot that shows its old token (``replace_input: token``) bans that token (no edit), but for ``align:
        whole-words``, where a rewritten word may end in the token its first one was. ``marks`` (B, L): each
        position's mark (``pack_marks``), read by a ``generator_input: marked`` network."""
        kw = {} if select is None else {"select": select}
        if self.options.generator_input == "marked":
            if marks is None:
                raise ValueError("a generator_input: marked network reads the generator's marks: pass marks=")
            kw["marks"] = marks
        logits = model(y, self._t(t, y.shape[0], y.device), attn_mask=self._keys(y), **kw).float()
        logits[..., self.never] = -math.inf
        logits[..., self.eos_id] = -math.inf  # a slot holds a token; [EOS] only ends the sequence
        if slots is not None and self.options.align != "whole-words":  # a rewritten word may end in its old token
            shown = slots & (y != self.mask_id)
            if select is None:
                b, i = shown.nonzero(as_tuple=True)
                logits[b, i, y[b, i]] = -math.inf
            else:
                n = shown[select].nonzero().squeeze(-1)
                logits[n, y[select][n]] = -math.inf
        return logits

    def training_pair(self, x_prev: list[int], x_t: list[int], L: int) -> tuple[list[int], list[int], list[int],
                                                                              list[int], list[int], list[int]]:
        """The targets for one (x_{t−1}, x_t): x_t and its ops / insert counts (insertions past max_insert and
        tokens past the row dropped), the generator's input with [MASK] slots, its targets (−1 elsewhere) and its
        marks."""
        x_t = x_t[: L - 1]
        s = self.script(x_t, x_prev)
        ins = [min(c, self.K) for c in s.ins]
        new, it = [], iter(s.new)
        for i in range(len(x_t) + 1):  # keep the new tokens of the capped script, in order
            taken = [next(it) for _ in range(s.ins[i])]
            new.extend(taken[: ins[i]])
            if i < len(x_t) and s.ops[i] == REPLACE:
                new.append(next(it))
        y, slot, marks = self.apply_tags(x_t, s.ops, ins, L)
        fill = iter(new)
        gen_target = [next(fill) if is_slot else -1 for is_slot in slot]
        return x_t, s.ops, ins, y, gen_target, marks

    def loss_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        """Per-row tagger + generator cross-entropy (nats), placed at each row's first position: (B, L)."""
        B, L = batch.tokens.shape
        dev = batch.tokens.device
        rngs = self._rngs(batch, generator)
        steps = (batch.time_uniforms(generator) * self.T).floor().long().clamp(0, self.T - 1) + 1
        xts, ops, inss, ys, gts, mks = [], [], [], [], [], []
        pairs = self.pairs_of(batch)
        data = [p[1] for p in pairs] if pairs else self.sequences(batch.tokens)  # x_0 of each row
        from ..models.seq2seq import reads_source  # (models imports diffusion)

        apart = reads_source(model)  # an encoder-decoder reads the source: corrupt the target itself
        for j, (k, r) in enumerate(zip(steps.tolist(), rngs)):
            chain = self.path_pair(*pairs[j], k, r) if pairs and not apart else self.corrupt_to(data[j], k, r)
            if self.options.target == "clean":  # x_0-prediction: the whole script from x_t to the data
                chain = (data[j], chain[1])
            x_t, o, n, y, g, m = self.training_pair(*chain, L)
            xts.append(x_t), ops.append(o), inss.append(n), ys.append(y), gts.append(g), mks.append(m)
        xt, y = self.net_input(xts, L, dev), self.net_input(ys, L, dev)
        marks = self.pack_marks(mks, y.shape[1], dev)
        op_t = torch.full(xt.shape, -100, dtype=torch.long)
        ins_t = torch.full(xt.shape, -100, dtype=torch.long)
        gen_t = torch.full(y.shape, -100, dtype=torch.long)
        for r in range(B):
            n = len(xts[r])
            op_t[r, :n] = torch.tensor(ops[r], dtype=torch.long)
            ins_t[r, : n + 1] = torch.tensor(inss[r], dtype=torch.long)  # the last gap at [EOS]
            g = torch.tensor(gts[r], dtype=torch.long)
            gen_t[r, : len(g)] = torch.where(g >= 0, g, -100)
        op_t, ins_t, gen_t = op_t.to(dev), ins_t.to(dev), gen_t.to(dev)
        tt = steps.to(dev).float() / self.T
        op_l, ins_l = self.tag_logits(model, xt, tt)
        tag = F.cross_entropy(op_l.transpose(1, 2), op_t, reduction="none", ignore_index=-100) \
            + F.cross_entropy(ins_l.transpose(1, 2), ins_t, reduction="none", ignore_index=-100)
        gen = torch.zeros(y.shape, device=dev)
        sel = gen_t >= 0
        if sel.any():
            logits = self.gen_logits(model, y, tt, sel, select=sel, marks=marks)
            gen[sel] = F.cross_entropy(logits, gen_t[sel], reduction="none")
        terms = torch.zeros(B, L, device=dev)
        terms[:, 0] = tag.sum(1) + gen.sum(1)
        return terms

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        """Not a bound (DiffusER has none): the edit loss, so that ``eval`` can compare runs of this family."""
        return self.loss_terms(model, batch, generator)

    # -- reverse step ------------------------------------------------------------------------------
    def step_time(self, k: int, steps: int) -> float:
        """The network time of revision k of ``steps`` (k counts down): the forward step ⌈kT/steps⌉ as a share of
        T, so any number of revisions walks the trained steps from T to 1."""
        return math.ceil(k * self.T / steps) / self.T

    def apply_tags(self, x_t: list[int], ops: list[int], ins: list[int], L: int) -> tuple[list[int], list[bool],
                                                                                         list[int]]:
        """The generator's input for tagged edits, which of its positions are slots, and each position's mark
        (MARK_KEPT / MARK_DELETED / MARK_SLOT), cut to the row: inserted slots [MASK], replaced slots [MASK] or
        their old token (``replace_input``), deleted tokens gone (``generator_input: edited``) or shown, marked
        deleted (``marked``; ``revised`` drops them once the slots are filled, and a full row drops them first).
        Either way ``revised`` of the filled input is the same sequence."""
        shown = self.options.replace_input == "token"
        keep_deleted = self.options.generator_input == "marked"
        y, marks = [], []
        for i in range(len(x_t) + 1):
            y.extend([self.mask_id] * ins[i])
            marks.extend([MARK_SLOT] * ins[i])
            if i == len(x_t) or (ops[i] == DELETE and not keep_deleted):
                continue
            y.append(self.mask_id if ops[i] == REPLACE and not shown else x_t[i])
            marks.append({KEEP: MARK_KEPT, DELETE: MARK_DELETED, REPLACE: MARK_SLOT}[ops[i]])
        over = len(y) - (L - 1)
        if over > 0 and keep_deleted:
            # the row is full: shown deletions go first (the last ones first), before any token the revision
            # writes or keeps, so it keeps what the edited input would
            drop = set([j for j, m in enumerate(marks) if m == MARK_DELETED][::-1][:over])
            y = [v for j, v in enumerate(y) if j not in drop]
            marks = [m for j, m in enumerate(marks) if j not in drop]
        return y[: L - 1], [m == MARK_SLOT for m in marks[: L - 1]], marks[: L - 1]

    @staticmethod
    def revised(filled: list[int], marks: list[int]) -> list[int]:
        """The sequence a revision makes: the generator's input with its slots ``filled``, deleted positions
        dropped (only ``generator_input: marked`` shows them)."""
        return [tok for tok, m in zip(filled, marks) if m != MARK_DELETED]

    def pack_marks(self, marks: list[list[int]], W: int, device=None) -> Tensor:
        """Rows (B, W) of the generator's marks, laid out as ``net_input`` lays out its input: [EOS] and [PAD]
        marked kept."""
        out = torch.full((len(marks), W), MARK_KEPT, dtype=torch.long)
        for r, m in enumerate(marks):
            m = m[: W - 1]
            out[r, : len(m)] = torch.tensor(m, dtype=torch.long)
        return out.to(device)


__all__ = ["DELETE", "KEEP", "MARK_DELETED", "MARK_KEPT", "MARK_SLOT", "MARK_TAGGER", "REPLACE", "EditDiffusion",
           "EditOptions"]
