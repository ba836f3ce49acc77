"""Likelihood evaluation for every family through one function: NELBO (or exact NLL) in nats per token,
perplexity bound, bits per character, with a 95% confidence interval over K independent time samples."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..data.datasets import TokenDataset
from ..diffusion.base import Process, low_discrepancy_uniform
from ..errors import DiffLMError
from ..models.seq2seq import bind_source
from ..precision import autocast
from ..rng import uniform

# two-sided 97.5% quantiles of Student's t with df = 1..30 (beyond: normal)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile_975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


@dataclass
class EvalResult:
    nelbo: float  # nats per token (an upper bound on the NLL; exact for autoregressive)
    ci95: float | None  # half-width of the 95% confidence interval of `nelbo` (None: one time sample, no interval)
    ppl: float  # exp(nelbo): a perplexity upper bound
    ppl_low: float | None
    ppl_high: float | None
    bpc: float | None  # bits per character (character-level tokenizers)
    bpc_ci95: float | None
    n_tokens: int
    n_sequences: int
    n_samples: int
    exact: bool
    per_sample: list[float]
    bound: bool = True  # False: the family's objective is no likelihood bound (edit diffusion): no perplexity

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if not self.bound:
            ci = "" if self.ci95 is None else f" ± {self.ci95:.4f}"
            return (f"edit loss {self.nelbo:.4f}{ci} nats/token (the family's training objective, not a likelihood "
                    f"bound: no perplexity) ({self.n_tokens} tokens, K={self.n_samples})")
        kind = "NLL" if self.exact else "NELBO"
        rel = "=" if self.exact else "≤"  # the AR NLL is exact: its perplexity is not a bound
        if self.ci95 is None:  # one Monte-Carlo draw of the bound has no interval
            s = f"{kind} {self.nelbo:.4f} nats/token, perplexity {rel} {self.ppl:.2f}"
            if self.bpc is not None:
                s += f", {self.bpc:.4f} bits/char"
            return s + f" ({self.n_tokens} tokens, K=1: one time sample has no interval; --samples 2+ gives one)"
        s = f"{kind} {self.nelbo:.4f} ± {self.ci95:.4f} nats/token, perplexity {rel} {self.ppl:.2f}"
        if not self.exact:
            s += f" [{self.ppl_low:.2f}, {self.ppl_high:.2f}]"
        if self.bpc is not None:
            s += f", {self.bpc:.4f} ± {self.bpc_ci95:.4f} bits/char"
        return s + f" ({self.n_tokens} tokens, K={self.n_samples})"


@torch.no_grad()
def evaluate(
    model: nn.Module, process: Process, dataset: TokenDataset, *, n_samples: int = 4, batch_size: int = 32,
    seed: int = 0, max_batches: int | None = None, bf16: bool = True, char_level: bool = False,
    device: torch.device | str = "cpu", progress: bool = False, all_steps: bool = False,
    left_to_right: bool = False,
) -> EvalResult:
    """Estimate the bound over ``dataset`` K = n_samples times with independent times; each pass uses
    low-discrepancy times across its batch. Exact-likelihood processes need (and get) one pass.
    all_steps: for discrete-time families (D3PM), evaluate every one of the T terms of the bound in each
    pass (T network calls per batch) instead of one term drawn at random.
    left_to_right: a clean-causal masked or block model's exact NLL under left-to-right decoding one token a call
    (``MaskedDiffusion.left_to_right_terms``), one pass, instead of the bound."""
    if all_steps and not process.discrete_time:
        raise DiffLMError(f"--all-steps applies to discrete-time families (d3pm), not to a {process.family} model")
    if left_to_right:
        if not hasattr(process, "left_to_right_nll"):
            raise DiffLMError(f"--left-to-right applies to clean-causal masked and block models, "
                              f"not to a {process.family} model")
        process.check_left_to_right(model)
    nelbo = process.left_to_right_nll if left_to_right else process.full_nelbo if all_steps else process.nelbo
    exact = process.exact_likelihood or left_to_right
    model.eval()
    K = 1 if exact else max(1, n_samples)
    N = len(dataset)
    n_batches = math.ceil(N / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    dev = torch.device(device)
    amp = autocast(dev, bf16)
    totals = []
    n_tokens = n_seq = 0
    it = range(K * n_batches)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="eval", unit="batch", leave=False)
    acc = torch.zeros(K, dtype=torch.float64)
    for j in it:
        k, b = divmod(j, n_batches)
        rows = list(range(b * batch_size, min(N, (b + 1) * batch_size)))
        batch = dataset.batch(rows).to(dev)
        u0 = float(uniform(seed, torch.tensor([k]), b, 1, stream=7)[0, 0])
        batch.u = low_discrepancy_uniform(u0, len(rows)).to(dev)
        gen = torch.Generator(device=dev).manual_seed(hash((seed, k, b)) & 0x7FFFFFFF)
        with amp:
            acc[k] += nelbo(bind_source(model, process, batch.tokens, batch.images), batch, generator=gen).sum().item()
        if k == 0:
            n_tokens += batch.n_tokens
            n_seq += len(rows)
    totals = (acc / n_tokens).tolist()
    mean = sum(totals) / K
    if K > 1:
        sd = math.sqrt(sum((x - mean) ** 2 for x in totals) / (K - 1))
        half = t_quantile_975(K - 1) * sd / math.sqrt(K)
    else:
        half = 0.0 if exact else None  # exact: no Monte-Carlo error; else unknown
    ln2 = math.log(2)
    return EvalResult(
        nelbo=mean, ci95=half, ppl=math.exp(mean), ppl_low=None if half is None else math.exp(mean - half),
        ppl_high=None if half is None else math.exp(mean + half), bpc=mean / ln2 if char_level else None,
        bpc_ci95=None if half is None or not char_level else half / ln2, n_tokens=n_tokens, n_sequences=n_seq,
        n_samples=K, exact=exact, per_sample=totals, bound=process.has_bound,
    )
