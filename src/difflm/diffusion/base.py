"""What every process shares: the batch it is given and the interface trainer, evaluator and samplers use."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..registry import BackboneNeeds, NoOptions, make_options
from ..rng import uniform

# Continuous-time families do not sample times below T_MIN; the part of the bound's integral over
# [0, T_MIN) that this drops is at most T_MIN × (the per-token loss rate at t→0): ~1e-5 nats/token.
T_MIN = 1e-5


@dataclass
class Batch:
    """A batch of token sequences.

    tokens:    (B, L) long, the clean data x0.
    loss_mask: (B, L) bool, True where the token is modelled (counted in loss and bound; never padding).
    fixed:     (B, L) bool, True where the token is given and never corrupted (padding, a seq2seq source).
    u:         (B,) float64 uniforms in [0, 1), low-discrepancy over the global batch; each process maps
               them to its own times. None = the process draws its own.
    rows:      (B,) int64 global row indices keying the corruption noise (with ``seed`` and ``step``), so a
               row's noise is the same whichever rank or micro-batch holds it. None = ``torch.rand``.
    images:    (B, C, H, W) float in [0, 1], the image each caption row describes (captioning); never noised.
    image_labels: (B, 4) long, what each cell of a scene image holds (``Scene.cell_labels``; 0 = nothing): the
               target of the captioner's auxiliary scene loss (``model.scene_loss``), never given to the network.
    """

    tokens: Tensor
    loss_mask: Tensor
    fixed: Tensor
    u: Tensor | None = None
    rows: Tensor | None = None
    seed: int = 0
    step: int = 0
    images: Tensor | None = None
    image_labels: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.tokens.to(device), self.loss_mask.to(device), self.fixed.to(device),
            None if self.u is None else self.u.to(device),
            None if self.rows is None else self.rows.to(device), self.seed, self.step,
            None if self.images is None else self.images.to(device),
            None if self.image_labels is None else self.image_labels.to(device),
        )

    @property
    def free(self) -> Tensor:
        """(B, L) bool: the modelled positions that are not given (``loss_mask`` and not ``fixed``)."""
        return self.loss_mask if self.fixed is None else self.loss_mask & ~self.fixed

    def time_uniforms(self, generator: torch.Generator | None = None) -> Tensor:
        """The (B,) float64 uniforms a process maps to times: ``u`` when set, else drawn from ``generator``."""
        if self.u is not None:
            return self.u.to(self.tokens.device)
        return torch.rand(self.tokens.shape[0], generator=generator, dtype=torch.float64).to(self.tokens.device)

    def rand(self, generator: torch.Generator | None = None, stream: int = 0, width: int | None = None) -> Tensor:
        """Float64 uniforms (B, width or L) for the forward process: keyed on (seed, row, step, stream) when
        ``rows`` is set, else drawn from ``generator``."""
        B, L = self.tokens.shape
        width = L if width is None else width
        if self.rows is not None:
            return uniform(self.seed, self.rows, self.step, width, stream=10 + stream)
        return torch.rand((B, width), generator=generator, dtype=torch.float64, device=self.tokens.device)

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum())


def low_discrepancy_uniform(u0: float, n: int, rank: int = 0, world: int = 1, dtype=torch.float64) -> Tensor:
    """Antithetic / stratified uniforms for this rank's n rows of a global batch of n·world rows:
    u_i = (u0 + i/(n·world)) mod 1 over global row index i (MDLM's low-discrepancy sampler, §3.5.1)."""
    idx = torch.arange(n, dtype=dtype) + rank * n
    return (u0 + idx / (n * world)) % 1.0


class Process(nn.Module):
    """The math of one family: what trainer, evaluator and samplers may call, with the same names in every
    family. A family is one subclass in its own file, decorated with ``registry.register_family``, declaring:

    family            the config's ``process.type``
    Options           a dataclass of its config keys (``registry.option`` fields, typed, checked when read)
    default_sampler   the sampler ``difflm sample`` uses when none is named
    backbone_needs()  the network it needs (``registry.BackboneNeeds``: attention, time conditioning, ...)

    and implementing:

    bound_terms(model, batch, generator)   per-position negative-ELBO terms (B, L) in nats; ``nelbo`` sums them
    loss(model, batch)                     the training objective per position (default: the bound's terms)
    corrupt(batch, t, generator)           x_t ~ q(x_t | x0) for the batch's free positions
    full_nelbo(model, batch, generator)    discrete-time families: every term of the bound (``--all-steps``)

    plus the reverse-step helpers its samplers need — by convention ``log_probs(model, xt, t, select=None)``
    for log p_θ(x0 | x_t) (discrete x0-predicting families), ``log_score`` (SEDD's concrete score) and
    ``predict_x0`` (Gaussian). Every per-position tensor is zero where ``loss_mask`` is False, so that
    ``terms.sum(-1)`` is a one-sample estimate of the sequence's negative ELBO.

    The constructor is shared: the vocabulary and special ids, ``never`` (ids that are never data), the length
    prior, and ``options`` (an ``Options`` instance built from the keyword arguments).
    """

    family: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    default_sampler: ClassVar[str] = ""
    #: True when the bound is exact (no Monte-Carlo over time): its confidence interval is zero. The judge of
    #: generative perplexity must have one.
    exact_likelihood: ClassVar[bool] = False
    #: False when ``bound_terms`` is the family's training objective but no likelihood bound (edit diffusion):
    #: evaluation reports it without a perplexity
    has_bound: ClassVar[bool] = True
    #: True when a seq2seq model's output replaces its source (edit diffusion revises it) instead of following
    #: it after [BOS]
    revises_source: ClassVar[bool] = False
    #: True when the family models the length itself ([EOS] and the padding after it are in its terms): the
    #: sampler is then not handed a length drawn from the length prior.
    generates_length: ClassVar[bool] = False
    #: True when the bound is a finite sum of T terms that ``full_nelbo`` evaluates all of (``--all-steps``).
    discrete_time: ClassVar[bool] = False

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, bos_id: int | None = None, *,
                 eos_id: int | None = None, length_prior: list[float] | None = None,
                 word_starts: Collection[int] = (), never: Collection[int] = (), **options) -> None:
        """word_starts: the tokenizer's ids that begin a word (``Tokenizer.word_starts``; the edit families align
        with them); never: more ids that are never data (``Tokenizer.unreachable_ids``), given no mass as
        [MASK] and [PAD] are."""
        super().__init__()
        self.word_starts = frozenset(word_starts)
        self.vocab_size, self.mask_id, self.pad_id = vocab_size, mask_id, pad_id
        self.bos_id, self.eos_id = bos_id, eos_id
        self.never = [i for i in (mask_id, pad_id, bos_id) if i is not None]  # ids that are never data
        self.never += sorted(set(never) - set(self.never) - {eos_id})
        self.options = make_options(self.Options, options, f"process.type {self.family}")
        self.set_length_prior(length_prior, pad_id)

    @property
    def aligned_by(self) -> frozenset[int]:
        """The word-start ids an edit family's training alignment keeps apart (``process.align: words``, the
        tie-break of ``edits.edit_script``), else none."""
        return self.word_starts if getattr(self.options, "align", "tokens") == "words" else frozenset()

    @classmethod
    def from_options(cls, options, *, vocab_size: int, special: dict[str, int],
                     length_prior: list[float] | None = None, word_starts: Collection[int] = (),
                     never: Collection[int] = ()) -> Process:
        """The process for a tokenizer's vocabulary and special ids, from an ``Options`` instance."""
        return cls(vocab_size, special["mask"], special["pad"], special.get("bos"), eos_id=special.get("eos"),
                   length_prior=length_prior, word_starts=word_starts, never=never,
                   **{f.name: getattr(options, f.name) for f in fields(options)})

    def backbone_needs(self) -> BackboneNeeds:
        """The network this family needs (default: bidirectional and time-free)."""
        return BackboneNeeds()

    def corrupt(self, batch: Batch, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_t ~ q(x_t | x0) at the batch's free positions (given positions unchanged), for times t (B,)."""
        raise NotImplementedError

    def bound_terms(self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-position negative-ELBO terms (B, L) for one draw of the noise (``generator`` for it)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Training objective per position (B, L); the bound unless a family trains on something else."""
        return self.bound_terms(model, batch)

    def full_nelbo(self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """The bound with every term evaluated (families with ``discrete_time``): (B,)."""
        raise NotImplementedError

    def set_length_prior(self, length_prior: list[float] | None, pad_id: int) -> None:
        """Models trained on padded lines see where padding starts, so their bound includes −log p(length),
        with p the (smoothed) training length distribution over 0..L; samplers draw lengths from it."""
        self.pad_id = pad_id
        lp = None if length_prior is None else torch.tensor(length_prior, dtype=torch.float64)
        self.register_buffer("length_log_prior", None if lp is None else torch.log(lp / lp.sum()), persistent=False)

    @property
    def draws_length(self) -> bool:
        """Whether samplers are handed a length drawn from the length prior (padded-lines models that do not
        generate their length)."""
        return self.length_log_prior is not None and not self.generates_length

    def sequence_terms(self, batch: Batch) -> Tensor:
        """Bound terms that belong to whole sequences rather than positions (B,): −log p(length)."""
        B = batch.tokens.shape[0]
        if self.length_log_prior is None or self.generates_length:
            return torch.zeros(B, dtype=torch.float32, device=batch.tokens.device)
        n = (batch.tokens != self.pad_id).sum(-1).clamp(max=len(self.length_log_prior) - 1)
        return -self.length_log_prior.to(batch.tokens.device)[n].float()

    def sample_length(self, u: Tensor) -> Tensor:
        """Lengths drawn from the length prior by inverse CDF of uniforms u (B,)."""
        cdf = self.length_log_prior.exp().cumsum(0).to(u.device)
        return torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(1, len(cdf) - 1)

    def nelbo(self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """One-sample estimate of the negative ELBO of each sequence, in nats: (B,)."""
        return self.sequence_nats(model, batch, lambda net: self.bound_terms(net, batch, generator=generator))

    def sequence_nats(self, model: nn.Module, batch: Batch, terms_of: Callable[[nn.Module], Tensor]) -> Tensor:
        """Per-position terms (B, L), ``terms_of`` the network bound to each row's source, summed per sequence with
        the sequence terms (−log p(length)), in nats: (B,)."""
        from ..models.seq2seq import bind_source, length_terms

        net = bind_source(model, self, batch.tokens, batch.images)
        seq = self.sequence_terms(batch).double() + length_terms(net, self, batch.tokens).double()  # −log p(length)
        return terms_of(net).double().sum(-1) + seq
