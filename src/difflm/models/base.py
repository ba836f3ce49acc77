"""What every backbone shares: the config fields a family's needs fill in (``derived``), and the module contract
the registry checks (``pretrained_init``, ``set_step``) with its defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor, nn

from ..registry import BackboneNeeds, derived

C = TypeVar("C", bound="BackboneConfig")


@dataclass
class BackboneConfig:
    """Base of every backbone's config: the fields ``with_needs`` derives from the family, the tokenizer and
    data.seq_len, never set in a run's ``model`` section."""

    vocab_size: int = derived(0)
    max_len: int = derived(1024)
    causal: bool = derived(False)
    time_conditioning: bool = derived(False)  # adaLN-zero (or additive) conditioning on t
    d_embed: int = derived(0)  # > 0: embedding diffusion: input z_t (B, L, d_embed), output x̂0 (B, L, d_embed)
    self_conditioning: bool = derived(False)  # embedding diffusion: the previous x̂0 is concatenated to the input
    aux_outputs: int = derived(0)  # width of a second output head (model(x, head="aux")), 0: none
    input_marks: int = derived(0)  # > 0: a learned embedding of per-position marks is added to the input

    def to_dict(self) -> dict:
        return asdict(self)

    def derive(self: C, needs: BackboneNeeds, vocab_size: int, max_len: int, *, embeddings: bool = False,
               aux: bool = False, marks: bool = False) -> C:
        """This config with the derived fields set for a family's needs (block-causal masks come per call);
        ``embeddings`` / ``aux``: the backbone can run Gaussian embedding diffusion / has an auxiliary head, else
        a family needing it is refused; ``marks``: the backbone reads per-position input marks."""
        name = type(self).__name__.removesuffix("Config").lower()
        if needs.d_embed and not embeddings:
            raise ValueError(f"the {name} backbone maps tokens to logits; Gaussian embedding diffusion needs "
                             "model.type transformer")
        if needs.aux_outputs and not aux:
            raise ValueError(f"the {name} backbone has no auxiliary head (the edit family's tagger): use "
                             "model.type transformer")
        if needs.input_marks and not marks:
            raise ValueError(f"the {name} backbone reads no per-position marks (process.generator_input: marked): "
                             "use model.type transformer, llama or bert, or generator_input: edited")
        return replace(self, vocab_size=vocab_size, max_len=max_len, causal=needs.attention == "causal",
                       time_conditioning=needs.time_conditioning, d_embed=needs.d_embed if embeddings else 0,
                       self_conditioning=needs.self_conditioning if embeddings else False,
                       aux_outputs=needs.aux_outputs if aux else 0, input_marks=needs.input_marks if marks else 0)


class Backbone(nn.Module):
    """Base of every backbone module (``register_backbone``): ``cfg``, ``embed`` (the token table) and the
    contract's defaults."""

    cfg: BackboneConfig
    embed: nn.Embedding

    def pretrained_init(self) -> bool:
        """Load the weights a fresh training run starts from (``model.init``); False: none."""
        return False

    def set_step(self, step: int) -> None:
        """Backbone contract: the trainer announces the optimizer step about to run (attention annealing)."""
        self.step = int(step)

    def open_fraction(self) -> float:
        """The fraction of the family's non-causal attention edges open now: step / anneal_steps while training
        within the annealing window, else 1 (inference always uses the family's full mask)."""
        n = getattr(self.cfg, "anneal_steps", 0)
        if not (n and self.training and not self.cfg.causal):
            return 1.0
        return min(1.0, getattr(self, "step", 0) / n)

    def annealed_mask(self, attn_mask: Tensor | None, L: int, positions: Tensor | None, device) -> Tensor | None:
        """DiffuLLaMA §3.2: the causal mask plus each edge to a later position opened with probability
        ``open_fraction`` (one draw per step, seeded by the step: resumable), intersected with the family's mask.
        At ``anneal_steps`` and after it is the family's own mask."""
        r = self.open_fraction()
        if r >= 1.0:
            return attn_mask
        pos = torch.arange(L, device=device) if positions is None else positions
        g = torch.Generator().manual_seed(1_000_003 * getattr(self, "step", 0) + 17)
        opened = torch.rand(L, L, generator=g) < r
        m = (pos[None, :] <= pos[:, None]) | opened.to(device)
        return m if attn_mask is None else attn_mask & m

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n
