"""Controllable generation for Gaussian embedding diffusion (Diffusion-LM §5, arXiv 2205.14217): attributes
computed from text without labels, an attribute classifier p_φ(c | z_t, t) trained on noisy embeddings of
the model's own training data, and the gradient guide that steers each reverse step toward the attribute.

Attributes (a string spec):
    contains:WORD    the row holds the token ids of WORD (for a character model: the substring)
    endswith:TEXT    the generated text ends with TEXT, e.g. ``endswith:?`` (a question)
    startswith:TEXT  the generated text starts with TEXT

Guidance (§5.2): after the sampler's step z_t -> z_s, K Adagrad steps on z_s minimise
    −scale · log p_φ(c | z_s, s) + fluency · ‖z_s − z_s⁰‖² / σ_s²
where z_s⁰ is the unguided z_s and σ_s² the step's posterior variance — the classifier term plus the
proximity (fluency) term that keeps z_s likely under the diffusion model's own transition.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .diffusion.gaussian import GaussianDiffusion
from .errors import DiffLMError
from .io import atomic_save_safetensors, atomic_write_text, read_safetensors
from .models import Transformer, TransformerConfig


# -- attributes ------------------------------------------------------------------------------------
@dataclass
class Attribute:
    """A yes/no property of a row of token ids, from its spec (see the module docstring)."""

    spec: str
    kind: str
    ids: list[int]
    stop: list[int]  # [EOS], [PAD]: the text ends there
    skip: list[int]  # [MASK], [BOS]: not text

    @classmethod
    def parse(cls, spec: str, tokenizer) -> Attribute:
        kind, _, arg = spec.partition(":")
        if kind not in ("contains", "endswith", "startswith") or not arg:
            raise DiffLMError(
                f"unknown attribute {spec!r}; use contains:WORD, endswith:TEXT (e.g. endswith:?) or startswith:TEXT"
            )
        ids = tokenizer.encode(arg)
        if not ids:
            raise DiffLMError(f"attribute {spec!r}: {arg!r} encodes to no tokens with this model's tokenizer")
        return cls(spec, kind, ids, [tokenizer.eos_id, tokenizer.pad_id], [tokenizer.mask_id, tokenizer.bos_id])

    def _text(self, row: list[int]) -> list[int]:
        """The row's text: up to its first [EOS]/[PAD] (a lines-mode row is one text), specials left out."""
        out = []
        for i in row:
            if i in self.stop:
                break
            if i not in self.skip:
                out.append(i)
        return out

    def __call__(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids -> (N,) bool."""
        n = len(self.ids)
        out = []
        for row in tokens.tolist():
            x = self._text(row)
            if self.kind == "endswith":
                out.append(x[-n:] == self.ids)
            elif self.kind == "startswith":
                out.append(x[:n] == self.ids)
            else:
                out.append(any(x[i : i + n] == self.ids for i in range(len(x) - n + 1)))
        return torch.tensor(out, dtype=torch.bool)


# -- the noisy-input classifier ----------------------------------------------------------------------
@dataclass
class ClassifierConfig:
    attribute: str
    embed_dim: int
    max_len: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    pooling: str = "attention"  # "attention": a learned softmax over positions; "mean": their average


class NoisyClassifier(nn.Module):
    """log-odds of the attribute from noisy embeddings: (z_t (B, L, d), t (B,)) -> (B,). A time-conditioned
    bidirectional transformer over z_t (the library's backbone), pooled over positions, then a linear read-out.
    Attention pooling (a learned score per position, softmax over the row) lets the read-out pick single
    positions — the last character before [EOS] for "ends with a question" — which an average dilutes by 1/L."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.body = Transformer(TransformerConfig(
            vocab_size=1, max_len=cfg.max_len, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
            time_conditioning=True, d_embed=cfg.embed_dim))
        nn.init.normal_(self.body.head.weight, 0.0, 0.02)  # the backbone zero-initialises its head
        if cfg.pooling not in ("attention", "mean"):
            raise DiffLMError(f"classifier pooling must be 'attention' or 'mean', not {cfg.pooling!r}")
        self.score = nn.Linear(cfg.embed_dim, 1) if cfg.pooling == "attention" else None
        self.out = nn.Linear(cfg.embed_dim, 1)

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        h = self.body(z, t)  # (B, L, d)
        if self.score is None:
            return self.out(h.mean(1))[:, 0]
        w = torch.softmax(self.score(h).float(), dim=1)  # (B, L, 1)
        return self.out((w * h).sum(1))[:, 0]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save_safetensors(weights, path / "classifier.safetensors", {"format": "difflm-classifier-1"})
        atomic_write_text(path / "classifier.json", json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> NoisyClassifier:
        path = Path(path)
        if not (path / "classifier.json").is_file() or not (path / "classifier.safetensors").is_file():
            raise DiffLMError(f"{path} holds no attribute classifier; train one with difflm train-classifier")
        try:
            cfg = ClassifierConfig(**{"pooling": "mean", **json.loads((path / "classifier.json").read_text())})
        except (TypeError, json.JSONDecodeError):
            raise DiffLMError(f"{path / 'classifier.json'} is not a difflm classifier config") from None
        clf = cls(cfg)
        weights, _ = read_safetensors(path / "classifier.safetensors")
        try:
            clf.load_state_dict(weights)
        except RuntimeError:
            raise DiffLMError(f"{path / 'classifier.safetensors'} does not fit classifier.json") from None
        return clf.eval()


def attribute_labels(lm, attribute: str, split: str = "train") -> Tensor:
    """(N,) bool: which rows of the run's ``split`` have the attribute; its mean is the data's base rate."""
    from .data import build_dataset

    data = build_dataset(lm.run.data, lm.tokenizer, split)
    return Attribute.parse(attribute, lm.tokenizer)(torch.from_numpy(data.tokens[:].astype("int64")))


def train_classifier(lm, attribute: str, *, steps: int = 500, batch_size: int = 64, lr: float = 1e-3,
                     seed: int = 0, layers: int = 2, d_model: int = 128, pooling: str = "attention",
                     log=print) -> tuple[NoisyClassifier, dict]:
    """Train p_φ(attribute | z_t, t) on the run's training split corrupted by its own forward process (the
    diffusion model's embeddings are frozen), with positives up-weighted to balance the classes. Returns the
    classifier and its validation accuracy at t = 0.1, 0.5, 0.9 with the attribute's base rate."""
    from .data import build_dataset

    if not isinstance(lm.process, GaussianDiffusion):
        raise DiffLMError("classifier guidance steers Gaussian embedding diffusion (Diffusion-LM); "
                          f"this is a {lm.process.family} model")
    attr = Attribute.parse(attribute, lm.tokenizer)
    train = build_dataset(lm.run.data, lm.tokenizer, "train")
    labels = attr(torch.from_numpy(train.tokens[:].astype("int64")))
    rate = float(labels.float().mean())
    if rate == 0.0 or rate == 1.0:
        raise DiffLMError(f"attribute {attribute!r} is {'never' if rate == 0 else 'always'} true in the training "
                          "data: nothing to learn; pick another")
    torch.manual_seed(seed)
    clf = NoisyClassifier(ClassifierConfig(attribute, lm.process.embed_dim, lm.seq_len, layers, 4, d_model, pooling))
    clf.to(lm.device).train()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    pos_weight = torch.tensor((1 - rate) / rate, device=lm.device)
    for step in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=g)
        b = train.batch(idx.tolist()).to(lm.device)
        t = torch.rand(batch_size, generator=g, dtype=torch.float64).to(lm.device)
        with torch.no_grad():
            z = lm.process.corrupt(b, t, g, model=lm.model)
        loss = F.binary_cross_entropy_with_logits(clf(z.float(), t.float()), labels[idx].float().to(lm.device),
                                                  pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"step {step + 1}/{steps} loss {float(loss):.4f}")
    clf.eval()
    stats = {"attribute": attribute, "base_rate": rate, "steps": steps}
    valid = build_dataset(lm.run.data, lm.tokenizer, "valid")
    n = min(len(valid), 512)
    b = valid.batch(list(range(n))).to(lm.device)
    y = attr(b.tokens.cpu()).to(lm.device)
    for t0 in (0.1, 0.5, 0.9):
        with torch.no_grad():
            z = lm.process.corrupt(b, torch.full((n,), t0, dtype=torch.float64, device=lm.device), g, model=lm.model)
            pred = clf(z.float(), torch.full((n,), t0, device=lm.device)) > 0
        stats[f"balanced_accuracy_t{t0}"] = 0.5 * (float(pred[y].float().mean()) if y.any() else math.nan) + \
            0.5 * (float((~pred[~y]).float().mean()) if (~y).any() else math.nan)
    return clf, stats


class ClassifierGuidance:
    """The guide a Gaussian sampler calls after each step (Diffusion-LM §5.2): ``steps`` Adagrad steps of
    size ``lr`` on z_s toward the attribute (``target``) with the fluency term weighted by ``fluency``.
    Each row's update depends only on that row (the loss is a sum over rows): batch invariance holds."""

    def __init__(self, classifier: NoisyClassifier, *, target: bool = True, scale: float = 1.0, steps: int = 3,
                 lr: float = 0.1, fluency: float = 0.01) -> None:
        if steps < 1 or lr <= 0 or scale < 0 or fluency < 0:
            raise DiffLMError("classifier guidance needs steps >= 1, lr > 0, scale >= 0 and fluency >= 0")
        self.clf, self.target = classifier, float(target)
        self.scale, self.steps, self.lr, self.fluency = float(scale), int(steps), float(lr), float(fluency)

    def __call__(self, z: Tensor, s: Tensor, var: Tensor, fixed: Tensor) -> Tensor:
        """z: (B, L, d) float64, the sampler's z_s; s: scalar time; var: σ_s² (scalar); fixed: (B, L, 1)."""
        if float(s) <= 0:
            return z
        anchor = z.float()
        var = max(float(var), 1e-8)
        with torch.enable_grad(), torch.autocast(z.device.type, enabled=False):
            x = anchor.clone().requires_grad_(True)
            opt = torch.optim.Adagrad([x], lr=self.lr)
            sv = torch.full((z.shape[0],), float(s), device=z.device)
            y = torch.full((z.shape[0],), self.target, device=z.device)
            for _ in range(self.steps):
                opt.zero_grad()
                nll = F.binary_cross_entropy_with_logits(self.clf(x, sv), y, reduction="sum")
                prox = ((x - anchor) ** 2).sum() / var
                (self.scale * nll + self.fluency * prox).backward()
                opt.step()
        return torch.where(fixed, z, x.detach().double())


def control_table(lm, attributes: list[tuple[str, NoisyClassifier]], ar=None, *, num: int = 64, steps: int = 100,
                  seed: int = 0, sampler: str = "ddpm", guide_options: dict | list[dict] | None = None,
                  log=None) -> list[dict]:
    """For each (attribute spec, classifier) and each guidance setting: the share of ``num`` samples that have
    the attribute without and with classifier guidance, and the samples' generative perplexity under the AR
    model ``ar`` (fluency). ``guide_options`` is one dict of ClassifierGuidance options or a list of them (a
    sweep: one row per attribute and setting, all against the same unguided samples). ``log`` (a callable
    taking a str) gets one line per sampling pass."""
    from .evaluation.generative import ar_nll, check_evaluator, special_ids

    if ar is not None:
        check_evaluator(lm, ar)
    special = special_ids(lm.tokenizer)
    settings = guide_options if isinstance(guide_options, list) else [guide_options or {}]

    def fluency(tokens: Tensor) -> float:
        if ar is None:
            return math.nan
        nll, n = ar_nll(ar, tokens, special)
        return math.exp(nll / max(n, 1))

    def sample(guide=None):
        t0 = time.perf_counter()
        out = lm.generate(num, steps=steps, sampler=sampler, seed=seed, batch_size=num,
                          sampler_options={} if guide is None else {"guide": guide})
        return out, time.perf_counter() - t0

    plain, secs = sample()
    plain_ppl = fluency(plain.tokens)
    if log:
        log(f"unguided: {num} samples x {steps} steps in {secs:.0f} s")
    rows = []
    for spec, clf in attributes:
        attr = Attribute.parse(spec, lm.tokenizer)
        plain_success = float(attr(plain.tokens).float().mean())
        for opts in settings:
            guided, secs = sample(ClassifierGuidance(clf, **opts))
            rows.append({"attribute": spec, "guide": dict(opts), "unguided_success": plain_success,
                         "guided_success": float(attr(guided.tokens).float().mean()),
                         "unguided_gen_ppl": plain_ppl, "guided_gen_ppl": fluency(guided.tokens),
                         "num": num, "steps": steps, "examples": guided.texts[:3]})
            if log:
                log(f"{spec} {opts}: success {plain_success:.1%} -> {rows[-1]['guided_success']:.1%}, "
                    f"gen. ppl {plain_ppl:.1f} -> {rows[-1]['guided_gen_ppl']:.1f} ({secs:.0f} s)")
    return rows
