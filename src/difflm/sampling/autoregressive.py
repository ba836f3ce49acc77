"""Left-to-right decoding for the autoregressive baseline, with the backbone's KV cache: ancestral sampling,
greedy decoding, or beam search (``beam`` > 1: the ``beam`` most probable prefixes of each row are kept; a
hypothesis ends at its [EOS], and the one of highest log-probability per token wins — length penalty 1, as in
fairseq's default). Beam search treats [EOS] as the end of the text (seq2seq targets, captions, lines) and stops
once every row has it; greedy and ancestral decoding run to the row's end (a packed stream goes on after [EOS])."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..diffusion.autoregressive import Autoregressive
from ..errors import DiffLMError
from ..models.seq2seq import SourceReader
from ..models.transformer import KVCache
from ..registry import option, register_sampler
from ..rng import uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo, on_rows
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning


@dataclass
class AutoregressiveOptions:
    greedy: bool = option(False, "take the most probable next token (greedy decoding) instead of drawing it")
    beam: int = option(1, "beam search over this many hypotheses per row (1 = off; deterministic, ignores "
                          "temperature and top_p; a hypothesis ends at its [EOS])", ge=1)

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise DiffLMError("--beam must be at least 1 (1 = no beam search)")


@register_sampler
class AutoregressiveSampler(Sampler):
    name = "autoregressive"
    families = ("autoregressive",)
    Options = AutoregressiveOptions
    step_free = True

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, process: Autoregressive, cond: Conditioning, *, steps: int = 0, seed: int = 0,
        rows: Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
        on_step: OnStep | None = None,
    ) -> SampleOutput:
        """Generates every free position left to right; ``steps`` is ignored (one call per token). A given position
        after the prompt (an infill's text after a gap) is forced: the tokens before it never read it."""
        rows = self.default_rows(cond, rows)
        if self.options.beam > 1:
            return self._beam_search(model, process, cond, on_step)
        B, L = cond.shape
        x = cond.tokens.clone()
        P = cond.prefix_length()  # prompt part shared by all rows, fed in one call
        cache = KVCache(len(model.blocks))
        inp = torch.cat([torch.full((B, 1), process.bos_id, device=x.device, dtype=torch.long), x[:, :P]], 1)
        nfe = torch.zeros(B, dtype=torch.long, device=x.device)
        logits = model(inp, cache=cache)[:, -1]
        nfe += 1
        for i in range(P, L):
            logits = logits.float()
            logits[:, process.never] = float("-inf")
            if self.options.greedy:
                tok = logits.argmax(-1)
            else:
                probs = probs_from_logits(logits, temperature, top_p)
                tok = sample_categorical(probs, uniform(seed, rows, i, 1)[:, 0])
            x[:, i] = torch.where(cond.fixed[:, i], x[:, i], tok)
            if on_step is not None:
                on_step(StepInfo(L - i, L - P, 1 - i / L, 1 - (i + 1) / L, x, nfe.clone()))
            if i + 1 < L:
                logits = model(x[:, i : i + 1], cache=cache)[:, -1]
                nfe += 1
        return SampleOutput(x, nfe)

    def _beam_search(self, model: nn.Module, process: Autoregressive, cond: Conditioning,
                     on_step: OnStep | None) -> SampleOutput:
        """Beam search with k = ``beam`` hypotheses per row, each row on its own (rows never share a beam, so a
        row's result does not depend on the batch). A hypothesis is finished at its [EOS] (the rest of its row is
        [EOS] fill, unscored) and keeps its slot; the others extend by every token. Each row returns its
        hypothesis of highest Σ log p / length (length counts the [EOS]). Given positions past the shared prompt
        are forced. (B, L) tokens; NFE counts one call per position, as greedy decoding."""
        from .guidance import ClassifierFreeGuidance

        if isinstance(model, ClassifierFreeGuidance):
            raise DiffLMError("beam search does not combine with --guidance; use greedy decoding or sampling")
        eos = process.eos_id
        k = self.options.beam
        B, L = cond.shape
        dev = cond.tokens.device
        P = cond.prefix_length()
        expand = torch.arange(B, device=dev).repeat_interleave(k)  # hypothesis h of row b sits at b·k + h
        if isinstance(model, SourceReader):
            model.memory()  # encode each source once, not once per hypothesis
        net = on_rows(model, expand)
        x = cond.tokens[expand].clone()
        fixed = cond.fixed[expand]
        score = torch.full((B, k), float("-inf"), device=dev, dtype=torch.float64)
        score[:, 0] = 0.0  # one live hypothesis to start from: the k slots must not hold copies of it
        length = torch.zeros(B * k, dtype=torch.long, device=dev)
        done = torch.zeros(B * k, dtype=torch.bool, device=dev)
        cache = KVCache(len(model.blocks))
        inp = torch.cat([torch.full((B * k, 1), process.bos_id, device=dev, dtype=torch.long), x[:, :P]], 1)
        logits = net(inp, cache=cache)[:, -1]
        nfe = torch.ones(B, dtype=torch.long, device=dev)
        arange = torch.arange(B, device=dev)
        for i in range(P, L):
            logits = logits.double()
            logits[:, process.never] = float("-inf")
            logp = torch.log_softmax(logits, -1)
            V = logp.shape[-1]
            # a forced (given) position: the given token, at no cost; a finished hypothesis: [EOS] fill, at no cost
            pinned = torch.where(fixed[:, i], x[:, i], torch.full_like(x[:, i], eos if eos is not None else 0))
            stay = fixed[:, i] | done
            only = torch.full_like(logp, float("-inf"))
            only.scatter_(-1, pinned[:, None], 0.0)
            logp = torch.where(stay[:, None], only, logp)
            cand = (score.reshape(-1, 1) + logp).reshape(B, k * V)
            best, idx = cand.topk(k, dim=-1)  # sorted: slot 0 is the row's best prefix
            origin = (arange[:, None] * k + idx // V).reshape(-1)
            tok = (idx % V).reshape(-1)
            x, done, length = x[origin], done[origin], length[origin]
            cache = cache.rows(origin)
            x[:, i] = tok
            length = length + (~done & ~fixed[:, i]).long()  # generated tokens, its [EOS] included
            if eos is not None:
                done = done | (tok == eos)
            score = best
            if on_step is not None:
                on_step(StepInfo(L - i, L - P, 1 - i / L, 1 - (i + 1) / L, x[::k], nfe.clone()))
            if bool(done.all()) or i + 1 == L:
                break
            logits = net(x[:, i : i + 1], cache=cache)[:, -1]
            nfe += 1
        if eos is not None:  # a finished hypothesis is [EOS] from its end to the row's end
            pos = torch.arange(L, device=dev)
            ended = (x == eos) & (pos >= P)
            first = torch.where(ended.any(-1), ended.float().argmax(-1), torch.full_like(length, L))
            x = torch.where((pos[None] > first[:, None]) & ~fixed, torch.full_like(x, eos), x)
        norm = (score.reshape(-1) / length.clamp_min(1)).reshape(B, k)
        pick = arange * k + norm.argmax(-1)
        return SampleOutput(x[pick], nfe)
