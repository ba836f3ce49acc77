"""τ-leaping for Edit Flows (Havasi et al. 2025, §3.3): ``steps`` steps of length h = 1/steps from the source
(τ = 0) to the data (τ = 1). In each, every gap inserts one token with probability 1 − e^{−hλ_ins} (drawn from
Q_ins), every token is deleted or substituted with probability 1 − e^{−h(λ_del + λ_sub)} (which one in proportion
to the rates; the new token from Q_sub), and all of a step's edits are made at once. Draws use the counter-based
RNG keyed on (seed, row, step), so a row's sequence does not depend on the batch. ``history`` records every step's
edits with their positions (``difflm revise --json``), in the format of DiffusER's sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..diffusion.editflow import TAU_MAX, EditFlow
from ..registry import option, register_sampler
from ..rng import uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning
from .edit import Revision, resolve_start


@dataclass
class TauLeapingOptions:
    bootstrap: Literal["default", "empty", "random", "draft"] = option(
        "default", "the start x_0: default (a given draft if any, else process.source), empty, random tokens "
        "(as process.source random draws them), draft")


@register_sampler
class TauLeaping(Sampler):
    name = "tau-leaping"
    families = ("editflow",)
    Options = TauLeapingOptions

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.history: list[list[Revision]] = []

    def start(self, process: EditFlow, cond: Conditioning, rows: Tensor, seed: int) -> list[list[int]]:
        """Each row's x_0 (flow time τ = 0)."""
        kind, drafts = resolve_start(self.options.bootstrap, process, cond)
        if kind != "random":
            return drafts
        L = cond.shape[1]
        u = uniform(seed, rows, 0, L // 2 + 1, stream=52)  # a length in [0, L // 2), then that many tokens
        ids = torch.tensor(process.data_ids)
        out = []
        for r in u:
            n = min(int(r[0] * (L // 2)), L // 2 - 1)
            out.append(ids[(r[1 : n + 1] * len(ids)).long().clamp(max=len(ids) - 1)].tolist())
        return out

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: EditFlow, cond: Conditioning, *, steps: int, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0, on_step: OnStep | None = None,
    ) -> SampleOutput:
        rows = self.default_rows(cond, rows, steps)
        B, L = cond.shape
        dev = cond.tokens.device
        seqs = [d[: L - 1] for d in self.start(process, cond, rows, seed)]
        self.history = [[] for _ in range(B)]
        nfe = torch.zeros(B, dtype=torch.long, device=dev)
        h = 1.0 / steps
        for k in range(steps):
            tau = min(k * h, TAU_MAX)
            x = process.pack(seqs, L, dev)
            lam, q_ins, q_sub = process.rates(model, x, torch.full((B,), tau, device=dev))
            nfe += 1
            u = uniform(seed, rows, k + 1, 4 * L, stream=51)  # gap, token, edit kind, inserted/substituted token
            ins_tok = sample_categorical(probs_from_logits(q_ins, temperature, top_p), u[:, 3 * L :])
            sub_tok = sample_categorical(probs_from_logits(q_sub, temperature, top_p), u[:, 2 * L : 3 * L])
            p_ins = 1 - torch.exp(-h * lam[..., 0].double())
            moved = lam[..., 1].double() + lam[..., 2].double()
            p_move = 1 - torch.exp(-h * moved)
            p_del = lam[..., 1].double() / moved.clamp(min=1e-300)
            for r, s in enumerate(seqs):
                out, n, rev = [], len(s), Revision(steps - k)
                for i in range(n + 1):
                    if u[r, i] < p_ins[r, i] and len(out) < L - 1:
                        out.append(int(ins_tok[r, i]))
                        rev.ops.append({"op": "INSERT", "at": i, "count": 1})
                    if i < n:
                        if u[r, L + i] < p_move[r, i]:  # an edit at token i: deleted or substituted
                            sub = u[r, L + i] / p_move[r, i] >= p_del[r, i]
                            rev.ops.append({"op": "REPLACE" if sub else "DELETE", "at": i, "token": s[i]})
                            if sub:
                                out.append(int(sub_tok[r, i]))
                        else:
                            out.append(s[i])
                seqs[r] = out[: L - 1]
                if rev.ops:
                    rev.text_ids = seqs[r]
                    self.history[r].append(rev)
            if on_step is not None:
                on_step(StepInfo(steps - k, steps, 1 - tau, 1 - min(tau + h, 1.0), process.pack(seqs, L, dev),
                                 nfe.clone()))
        return SampleOutput(process.pack(seqs, L, dev), nfe)

