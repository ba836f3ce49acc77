"""Families, samplers and backbones declare themselves in one place (``difflm.registry``).

The proof: a family and a sampler defined here, in the tests and not under src/, train, evaluate, sample, run
in ``bench-sampling`` and show up in ``difflm sample --help`` — without any file of difflm knowing them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error

from difflm import registry
from difflm.cli import main
from difflm.config import RunConfig
from difflm.diffusion import Batch, Process
from difflm.errors import DiffLMError
from difflm.pipeline import DiffusionLM
from difflm.registry import BackboneNeeds, option
from difflm.rng import uniform
from difflm.sampling import SampleOutput, Sampler, StepInfo, get_sampler
from difflm.sampling.categorical import probs_from_logits, sample_categorical
from difflm.training.trainer import Trainer


# ---- a toy family: masked diffusion with the linear schedule α(t) = 1 − t, in a dozen lines ------------
@dataclass
class ToyOptions:
    t_min: float = option(1e-3, "smallest training time")


class ToyMasked(Process):
    """Mask each free token with probability t; bound ∫ 1/t · Σ_masked −log p(x0ⁱ | x_t) dt (MDLM eq. 10 with
    α = 1 − t)."""

    family = "toy-mask"
    Options = ToyOptions
    default_sampler = "toy-order"

    def backbone_needs(self) -> BackboneNeeds:
        return BackboneNeeds()  # bidirectional, time-free

    def corrupt(self, batch, t, generator=None):
        masked = (batch.rand(generator) < t.double()[:, None]) & ~batch.fixed
        return torch.where(masked, torch.full_like(batch.tokens, self.mask_id), batch.tokens)

    def log_probs(self, model, xt):
        logits = model(xt).float()
        logits[..., self.never] = -math.inf
        return F.log_softmax(logits, -1)

    def bound_terms(self, model, batch, generator=None):
        t = self.options.t_min + (1 - self.options.t_min) * batch.time_uniforms(generator)
        xt = self.corrupt(batch, t, generator)
        counted = (xt == self.mask_id) & batch.loss_mask
        nll = -self.log_probs(model, xt).gather(-1, batch.tokens[..., None])[..., 0]
        return torch.where(counted, nll / t.float()[:, None], torch.zeros_like(nll))


@dataclass
class OrderOptions:
    greedy: bool = option(False, "take each position's most likely token instead of sampling it")


class LeftToRight(Sampler):
    """Unmask the free positions left to right, an equal share per step."""

    name = "toy-order"
    families = ("toy-mask",)
    Options = OrderOptions
    bench = ({}, {"greedy": True})

    @torch.no_grad()
    def __call__(self, model, process, cond, *, steps, seed=0, rows=None, temperature=1.0, top_p=1.0,
                 on_step=None):
        rows = self.default_rows(cond, rows, steps)
        B, L = cond.shape
        x = cond.initial(process.mask_id)
        nfe = torch.zeros(B, dtype=torch.long)
        per = -(-L // steps)
        for k in range(steps):
            now = torch.zeros_like(cond.fixed)
            now[:, k * per : (k + 1) * per] = True
            now &= x == process.mask_id
            logp = process.log_probs(model, x)
            nfe += 1
            if now.any():
                probs = probs_from_logits(logp[now], temperature, top_p)
                tok = probs.argmax(-1) if self.options.greedy else \
                    sample_categorical(probs, uniform(seed, rows, k, L, stream=1)[now])
                x = x.clone()
                x[now] = tok
            if on_step is not None:
                on_step(StepInfo(steps - k, steps, 1 - k / steps, 1 - (k + 1) / steps, x, nfe.clone()))
        return SampleOutput(x, nfe)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    lines = ["abab abab", "baba baba", "aabb aabb", "abba abba"] * 60
    (d / "train.txt").write_text("\n".join(lines))
    (d / "valid.txt").write_text("\n".join(lines[:40]))
    run = {"name": "toy", "data": {"corpus": "text", "path": str(d / "train.txt"), "valid_path": str(d / "valid.txt"),
                                   "mode": "lines", "seq_len": 12, "cache_dir": str(d / "cache")},
           "tokenizer": {"type": "char"}, "model": {"n_layer": 1, "n_head": 2, "d_model": 32},
           "process": {"type": "toy-mask", "t_min": 0.01},
           "train": {"batch_size": 16, "max_steps": 60, "lr": 3e-3, "warmup_steps": 5, "ema": 0.0,
                     "eval_every": 10**6, "save_every": 10**6, "tensorboard": False, "bf16": False},
           "sample": {"steps": 4}}
    with registry.registered(ToyMasked, LeftToRight):
        Trainer(RunConfig.from_dict(run), d / "run", progress=False).fit()
    return d / "run"


def test_registration_needs_the_declarations():
    class NoFamily(Process):
        Options = ToyOptions
        default_sampler = "x"

    with pytest.raises(TypeError, match="must declare family"):
        registry.register_family(NoFamily)

    class NoName(Sampler):
        families = ("masked",)

    with pytest.raises(TypeError, match="must declare name"):
        registry.register_sampler(NoName)


def test_a_family_defined_outside_src_trains_evaluates_and_samples(toy_run):
    with registry.registered(ToyMasked, LeftToRight):
        lm = DiffusionLM.from_pretrained(toy_run, device="cpu")
        assert lm.process.family == "toy-mask" and lm.process.options.t_min == 0.01
        trained = lm.evaluate("valid", samples=4, bf16=False)
        torch.manual_seed(0)
        for p in lm.model.parameters():  # the same model untrained: its bound must be far worse
            torch.nn.init.normal_(p, 0, 0.02)
        untrained = lm.evaluate("valid", samples=4, bf16=False)
        assert trained.nelbo < untrained.nelbo - 0.5
        lm = DiffusionLM.from_pretrained(toy_run, device="cpu")
        g = lm.generate(5, steps=4, seed=1)
        assert g.nfe.tolist() == [4] * 5
        assert [t for t in g.texts if t] and all(set(t) <= set("ab ") for t in g.texts)
        one_by_one = [lm.generate(5, steps=4, seed=1, batch_size=1).texts]
        assert one_by_one == [g.texts]  # counter-based RNG: the same text at any batch size
        greedy = lm.generate(3, steps=4, seed=1, sampler_options={"greedy": True}).texts
        assert greedy == lm.generate(3, steps=4, seed=2, sampler_options={"greedy": True}).texts
    with pytest.raises(DiffLMError, match="unknown process.type 'toy-mask'"):
        DiffusionLM.from_pretrained(toy_run)  # unregistered again


def test_the_toy_sampler_is_in_bench_sampling_and_the_cli_help(toy_run, capsys):
    with registry.registered(ToyMasked, LeftToRight):
        assert main(["bench-sampling", str(toy_run), "--steps", "2,4", "--num", "2", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["rows"]
        assert [(r["sampler"], r["options"], r["steps"]) for r in rows] == [
            ("toy-order", {}, 2), ("toy-order", {}, 4), ("toy-order", {"greedy": True}, 2),
            ("toy-order", {"greedy": True}, 4)]
        with pytest.raises(SystemExit):
            main(["sample", str(toy_run), "--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
        assert "toy-mask: toy-order" in out and "--greedy" in out and "take each position's most likely" in out
        assert main(["sample", str(toy_run), "--sampler", "toy-order", "--help"]) == 0
        out = capsys.readouterr().out
        assert "sampler toy-order (families: toy-mask)" in out and "--greedy" in out
        assert main(["sample", str(toy_run), "--greedy", "--steps", "3", "--num", "2", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["nfe"] == [3, 3]
        # an option of another sampler: one line naming this sampler's real options
        assert main(["sample", str(toy_run), "--eta", "0.1"]) == 2
        err = capsys.readouterr().err
        assert one_line_error(err) and "sampler 'toy-order' has no option eta; its options: greedy" in err


def test_sampler_help_and_option_errors_for_builtin_samplers(capsys):
    assert main(["sample", "RUN", "--sampler", "remdm", "--help"]) == 0
    out = capsys.readouterr().out
    assert "sampler remdm (families: masked)" in out and "--eta" in out and "--strategy" in out
    assert main(["sample", "RUN", "--sampler", "ancestral", "-h"]) == 0
    out = capsys.readouterr().out
    assert out.count("sampler ancestral") == 3  # masked, uniform, d3pm
    assert main(["sample", "RUN", "--sampler", "nope", "--help"]) == 2
    assert one_line_error(capsys.readouterr().err)
    proc = registry.family("masked").from_options(registry.family("masked").Options(), vocab_size=6,
                                                  special={"mask": 4, "pad": 5})
    with pytest.raises(DiffLMError, match="sampler 'cached' has no option eta; its options: none"):
        get_sampler("cached", proc, eta=0.1)
    with pytest.raises(DiffLMError, match="ReMDM strategy must be cap or rescale"):
        get_sampler("remdm", proc, strategy="loop")


def test_every_registered_family_declares_what_the_library_reads():
    families = registry.families()
    assert list(families)[:1] == ["masked"] and "autoregressive" in families
    for name, cls in families.items():
        assert cls.family == name and cls.Options.family == name
        assert cls.default_sampler in [c.name for c in registry.samplers(name)], name
        proc = cls.from_options(cls.Options(), vocab_size=8, special={"mask": 4, "pad": 5, "bos": 6, "eos": 7})
        assert isinstance(proc.backbone_needs(), BackboneNeeds)
    for c in registry.samplers():
        for setting in c.bench:  # every benchmark setting is a valid set of options
            c.Options(**setting)


def test_config_sections_are_typed_by_the_registered_classes():
    run = RunConfig.from_dict({"process": {"type": "d3pm", "steps": 20}})
    assert run.family == "d3pm" and run.process.steps == 20 and run.process.transition == "absorb"
    assert RunConfig.from_dict(run.to_dict()).to_dict() == run.to_dict()
    assert run.to_dict()["model"]["type"] == "transformer"
    bad = [({"process": {"type": "masked", "bogus": 1}}, "unknown config key(s) process.bogus for process.type masked"),
           ({"process": {"type": "d3pm", "steps": "many"}}, "process.steps must be an integer"),
           ({"process": {"type": "d3pm", "transition": "band"}}, "process.transition must be one of"),
           ({"process": {"type": "nope"}}, "unknown process.type 'nope'; choose one of masked, block"),
           ({"model": {"causal": True}}, "model.causal is set from the tokenizer"),
           ({"model": {"type": "mamba"}}, "unknown model.type 'mamba'"),
           ({"model": {"n_layer": 2.5}}, "model.n_layer must be an integer"),
           ({"process": {"type": "block", "clip": [0.3, "x"]}}, "process.clip"),
           ({"train": {"threads": "four"}}, "train.threads must be an integer or null")]
    for d, msg in bad:
        with pytest.raises(DiffLMError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            RunConfig.from_dict(d)


def test_a_backbone_is_built_from_its_one_config_and_the_familys_needs():
    from difflm.components import build_components
    from difflm.data.tokenizers import train_char

    tok = train_char(["abc"])
    for process, causal, time, d_embed in (({"type": "autoregressive"}, True, False, 0),
                                           ({"type": "sedd"}, False, True, 0),
                                           ({"type": "gaussian", "embed_dim": 8}, False, True, 8),
                                           ({"type": "block", "block_size": 2}, False, False, 0)):
        run = RunConfig.from_dict({"process": process, "model": {"n_layer": 1, "n_head": 2, "d_model": 16},
                                   "data": {"seq_len": 8}})
        model, _ = build_components(run, tok)
        cfg = model.cfg
        assert (cfg.causal, cfg.time_conditioning, cfg.d_embed) == (causal, time, d_embed), process
        assert (cfg.vocab_size, cfg.max_len, cfg.n_layer, cfg.d_model) == (tok.vocab_size, 8, 1, 16)


def test_the_toy_bound_is_zero_for_an_exact_predictor():
    """With a predictor that is certain of the only token the data holds, every term of the toy's bound is ~0."""
    proc = ToyMasked(3, 1, 2)
    model = lambda x: torch.tensor([9.0, -9.0, -9.0]).expand(*x.shape, 3).clone()  # noqa: E731  (always token 0)
    x0 = torch.zeros(4, 5, dtype=torch.long)
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros_like(x0, dtype=torch.bool))
    terms = proc.bound_terms(model, batch)
    assert terms.max() < 1e-6
