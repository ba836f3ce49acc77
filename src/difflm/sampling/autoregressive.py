"""Left-to-right sampling for the autoregressive baseline, with the backbone's KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..diffusion.autoregressive import Autoregressive
from ..errors import DiffLMError
from ..models.transformer import KVCache
from ..registry import option, register_sampler
from ..rng import uniform
from .base import OnStep, SampleOutput, Sampler, StepInfo
from .categorical import probs_from_logits, sample_categorical
from .conditioning import Conditioning


@dataclass
class AutoregressiveOptions:
    greedy: bool = option(False, "take the most probable next token (greedy decoding) instead of drawing it")


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
        """Generates every free position left to right; ``steps`` is ignored (one call per token)."""
        if not cond.is_prefix_only():
            raise DiffLMError(
                "an autoregressive model can only continue a prefix; use a diffusion model to fill gaps"
            )
        rows = self.default_rows(cond, rows)
        B, L = cond.shape
        x = cond.tokens.clone()
        P = int(cond.fixed.sum(-1).min())  # prompt part shared by all rows, fed in one call
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
