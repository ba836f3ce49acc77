"""Edit Flows (Havasi, Karrer, Gat & Chen 2025, arXiv 2506.09018): a continuous-time Markov chain over sequences
of any length whose moves are single edits — insert token a in gap i, delete token i, substitute token i by a —
at rates the network predicts from the current sequence x and the flow time τ (τ = 0 the source, τ = 1 the data;
difflm's network input is t = 1 − τ, its usual "t = 1 is noise"):

    u(ins(x, i, a) | x) = λ_ins,i(x) Q_ins,i(a | x),   u(del(x, i) | x) = λ_del,i(x),
    u(sub(x, i, a) | x) = λ_sub,i(x) Q_sub,i(a | x)   (a ≠ x_i)

Training (§3.2) goes through an auxiliary alignment: a source x_0 (the empty sequence, or the seq2seq source) and
the data x_1 are aligned column by column with blanks ε (z_0, z_1, same length; here the Levenshtein alignment:
kept, replaced, deleted (x, ε) and inserted (ε, y) columns). Each column switches from z_0 to z_1 at a time
drawn from κ (κ(τ) = τ), so z_τ mixes the two and x_τ is z_τ without blanks. The loss is the Bregman divergence
of discrete flow matching (§3.2 there):

    L = E_{τ, z_τ} [ Σ_{edits e of x_τ} u_θ(e | x_τ)  −  Σ_{columns i: z_τ^i ≠ z_1^i} κ̇/(1 − κ) log u_θ(e_i | x_τ) ]

where e_i is the edit that sets column i to z_1^i (an insertion if z_τ^i = ε, a deletion if z_1^i = ε, else a
substitution). Adding Σ_e (r_e log r_e − r_e) for the reference rates r_e (κ̇/(1 − κ) times the number of columns
asking for edit e) makes it the KL between the aligned reference process and the model's chain, as in SEDD's score
entropy; it bounds −log p_θ(x_1) only through the alignment (a joint bound on x_1 and the path of columns), so
difflm reports it as the family's loss, not as a likelihood bound (``has_bound`` False).

Sampling (§3.3) is τ-leaping: over a step of length h every gap inserts with probability 1 − e^{−hλ_ins} and every
token is deleted or substituted with probability 1 − e^{−h(λ_del + λ_sub)}, all edits of a step made at once.

The network: the backbone's token head gives Q_sub; its auxiliary head gives the three log-rates and Q_ins
(``BackboneNeeds.aux_outputs`` = 3 + V); gap i is read at token i, the last gap at [EOS].
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffLMError
from ..registry import BackboneNeeds, option, register_family
from .base import Batch, Process
from .edit import EditDiffusion
from .edits import ALIGN_HELP, DELETE, KEEP, REPLACE, edit_script

EPS = -1  # the blank symbol ε of an alignment column
TAU_MAX = 1 - 1e-3  # κ̇/(1 − κ) = 1/(1 − τ) is cut here


@dataclass
class EditFlowOptions:
    kappa: Literal["linear", "cubic"] = option("linear", "κ(τ): linear τ, or cubic 1 − (1 − τ)³ (columns switch "
                                               "early)")
    align: Literal["words", "tokens"] = option("words", ALIGN_HELP)
    source: Literal["empty", "random"] = option("empty", "x_0 for unconditional models: the empty sequence or "
                                                "random tokens of a random length (seq2seq: the source)")


@register_family
class EditFlow(Process):
    family = "editflow"
    Options = EditFlowOptions
    default_sampler = "tau-leaping"
    exact_likelihood = False
    has_bound = False
    generates_length = True
    revises_source = True

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, **kw) -> None:
        super().__init__(vocab_size, mask_id, pad_id, bos_id, **kw)
        if self.eos_id is None:
            raise DiffLMError("Edit Flows needs a tokenizer with [EOS] (it ends every sequence)")
        banned = set(self.never) | {self.eos_id}
        self.data_ids = [i for i in range(vocab_size) if i not in banned]
        self.banned = sorted(banned)

    def backbone_needs(self) -> BackboneNeeds:
        return BackboneNeeds(time_conditioning=True, aux_outputs=3 + self.vocab_size)

    def trained_starts(self, seq2seq: bool) -> tuple[str, ...]:
        """The x_0 the training paths started from: the seq2seq source (a draft), else ``options.source``."""
        return ("draft",) if seq2seq else (self.options.source,)

    def default_start(self) -> str:
        return self.options.source

    # shared layout helpers (rows: the sequence, [EOS], [PAD])
    sequences = EditDiffusion.sequences
    pack = EditDiffusion.pack
    _rngs = EditDiffusion._rngs
    pairs_of = EditDiffusion.pairs_of

    def kappa(self, tau: float) -> tuple[float, float]:
        """(κ(τ), κ̇(τ)/(1 − κ(τ)))."""
        if self.options.kappa == "linear":
            return tau, 1.0 / (1.0 - tau)
        return 1 - (1 - tau) ** 3, 3.0 / (1.0 - tau)

    # -- the network's rates -------------------------------------------------------------------------
    def rates(self, model: nn.Module, x: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(λ (B, L, 3) ≥ 0 for insert / delete / substitute, log Q_ins (B, L, V), log Q_sub (B, L, V) with the
        current token and never-data ids excluded), float32; τ (B,) flow times."""
        t = (1 - tau).float()  # difflm's network time: 1 is the source end
        aux = model(x, t, head="aux").float()
        lam = F.softplus(aux[..., :3])
        ban = torch.zeros(self.vocab_size, dtype=torch.bool, device=x.device)
        ban[self.banned] = True
        q_ins = aux[..., 3:].masked_fill(ban, -math.inf)
        q_sub = model(x, t).float().masked_fill(ban, -math.inf)
        q_sub = q_sub.scatter(-1, x.unsqueeze(-1), -math.inf)  # substituting a token by itself is no edit
        return lam, q_ins.log_softmax(-1), q_sub.log_softmax(-1)

    # -- alignment and the mixture path --------------------------------------------------------------
    @staticmethod
    def columns(src: list[int], tgt: list[int], starts: Collection[int] = ()) -> list[tuple[int, int]]:
        """The Levenshtein alignment of source and target as (z_0, z_1) columns, ε = −1; ``starts``: the word-start
        ids whose substitutions it avoids among the shortest (``edit_script``)."""
        s = edit_script(src, tgt, starts)
        cols, new = [], iter(s.new)
        for i in range(len(src) + 1):
            cols.extend((EPS, next(new)) for _ in range(s.ins[i]))
            if i < len(src):
                if s.ops[i] == KEEP:
                    cols.append((src[i], src[i]))
                elif s.ops[i] == REPLACE:
                    cols.append((src[i], next(new)))
                else:
                    assert s.ops[i] == DELETE
                    cols.append((src[i], EPS))
        return cols

    def source_of(self, x1: list[int], rng: random.Random, L: int) -> list[int]:
        if self.options.source == "empty":
            return []
        return [rng.choice(self.data_ids) for _ in range(rng.randrange(0, L // 2))]

    @staticmethod
    def mix(cols: list[tuple[int, int]], kappa: float, rng: random.Random) -> tuple[list[int], list[tuple]]:
        """x_τ and the edits still to make: each column is at z_1 with probability κ, else at z_0. Returns (x_τ,
        [(kind, position, token), ...]) with kind "ins" (gap position), "del" or "sub" (token position)."""
        z = [b if rng.random() < kappa else a for a, b in cols]
        x, todo, pos = [], [], 0
        for (_, b), c in zip(cols, z):
            if c != b:  # not yet at z_1
                if c == EPS:
                    todo.append(("ins", pos, b))
                elif b == EPS:
                    todo.append(("del", pos, None))
                else:
                    todo.append(("sub", pos, b))
            if c != EPS:
                x.append(c)
                pos += 1
        return x, todo

    def loss_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        """Per-row Bregman loss (nats) at each row's first position: (B, L)."""
        B, L = batch.tokens.shape
        dev = batch.tokens.device
        rngs = self._rngs(batch, generator)
        taus = (batch.time_uniforms(generator) * TAU_MAX).tolist()
        pairs = self.pairs_of(batch)
        xs, todos, ws = [], [], []
        for j, (tau, r) in enumerate(zip(taus, rngs)):
            src, tgt = pairs[j] if pairs else (None, self.sequences(batch.tokens[j : j + 1])[0])
            if src is None:
                src = self.source_of(tgt, r, L)
            kap, w = self.kappa(tau)
            x, todo = self.mix(self.columns(src[: L - 1], tgt[: L - 1], self.aligned_by), kap, r)
            x = x[: L - 1]
            xs.append(x), todos.append([e for e in todo if e[1] <= len(x)]), ws.append(w)
        xt = self.pack(xs, L, dev)
        lam, q_ins, q_sub = self.rates(model, xt, torch.tensor(taus, device=dev))
        lengths = torch.tensor([len(x) for x in xs], device=dev)
        pos = torch.arange(L, device=dev)[None]
        total = (lam[..., 0] * (pos <= lengths[:, None])).sum(1) \
            + ((lam[..., 1] + lam[..., 2]) * (pos < lengths[:, None])).sum(1)
        logu = torch.zeros(B, device=dev)
        for kind, k in (("ins", 0), ("del", 1), ("sub", 2)):  # Σ κ̇/(1 − κ) log u_θ(e_i), gathered by kind
            at = [(j, p, 0 if tok is None else tok)
                  for j, todo in enumerate(todos) for kd, p, tok in todo if kd == kind]
            if not at:
                continue
            J, P, T = (torch.tensor(v, device=dev) for v in zip(*at))
            val = lam[J, P, k].log()
            if kind != "del":
                val = val + (q_ins if kind == "ins" else q_sub)[J, P, T]
            logu = logu.index_add(0, J, torch.tensor(ws, device=dev)[J] * val)
        terms = torch.zeros(B, L, device=dev)
        terms[:, 0] = total - logu
        return terms

    def bound_terms(self, model: nn.Module, batch: Batch, generator=None) -> Tensor:
        """Not a likelihood bound (see the module docstring): the Bregman loss, so runs can be compared."""
        return self.loss_terms(model, batch, generator)

    def corrupt(self, batch: Batch, t: Tensor, generator=None) -> Tensor:
        """x_τ on the mixture path at difflm times t (B,) (τ = 1 − t): rows (B, L)."""
        B, L = batch.tokens.shape
        rngs = self._rngs(batch, generator)
        pairs = self.pairs_of(batch)
        rows = []
        for j, (tt, r) in enumerate(zip(t.tolist(), rngs)):
            src, tgt = pairs[j] if pairs else (None, self.sequences(batch.tokens[j : j + 1])[0])
            src = self.source_of(tgt, r, L) if src is None else src
            rows.append(self.mix(self.columns(src, tgt, self.aligned_by), self.kappa(min(1 - tt, TAU_MAX))[0], r)[0])
        return self.pack(rows, L, batch.tokens.device)
