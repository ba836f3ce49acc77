"""``difflm convert`` against the reference fixtures of ../shared/oracles/, copied to tests/fixtures/oracles (tiny
randomly initialised MDLM, SEDD and BD3-LM networks in their own key names, with the outputs the reference code
computed): each is laid out as its published checkpoint folder, converted by the CLI, loaded with
``DiffusionLM.from_pretrained`` and run through difflm's process math. Tolerance 1e-5 (the fixtures' README);
SUBS's −1e6 sentinels are compared as "no mass" (difflm writes −inf)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflm.pipeline import DiffusionLM

ORACLES = Path(__file__).resolve().parent / "fixtures" / "oracles"  # a copy of ../shared/oracles (1.8 MB)
TOL = 1e-5
V = 51  # 50 ordinary ids + the reference's [MASK] (50)


def tokenizer_json(path: Path) -> Path:
    """50 ordinary tokens, the last being GPT-2's end of text (as in the real vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(49)} | {"<|endoftext|>": 49}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def published(name: str, tmp: Path, layout: str) -> Path:
    """The fixture as the checkpoint a user downloads: Hub wrapper (``backbone.`` keys, flat config) or SEDD's
    mixin folder (bare keys, its own config)."""
    ref = json.loads((ORACLES / f"{name}.json").read_text())
    state = load_file(str(ORACLES / f"{name}.safetensors"))
    d = tmp / f"{name}-{layout}"
    d.mkdir()
    m = ref["config"]["model"]
    if layout == "hub":
        state = {f"backbone.{k}": v for k, v in state.items()}
        cfg = {"vocab_size": V, "model_length": m["length"], "hidden_dim": m["hidden_size"], "cond_dim": m["cond_dim"],
               "n_blocks": m["n_blocks"], "n_heads": m["n_heads"], "dropout": 0.0, "time_conditioning": False}
        if "block_size" in ref["config"]:
            cfg["block_size"] = ref["config"]["block_size"]
            state["sampling_eps_min"], state["sampling_eps_max"] = torch.tensor(1e-3), torch.tensor(0.999)
    else:
        cfg = ref["config"]
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def convert(kind: str, src: Path, tmp: Path) -> DiffusionLM:
    out = tmp / f"{kind}-converted"
    tok = tokenizer_json(tmp / "tokenizer.json")
    r = subprocess.run([sys.executable, "-m", "difflm.cli", "convert", "--from", kind, str(src), str(out),
                        "--tokenizer", str(tok)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lm = DiffusionLM.from_pretrained(out, device="cpu")
    assert lm.tokenizer.mask_id == 50 and lm.tokenizer.eos_id == 49
    return lm


def io(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(ORACLES / f"{name}-io.safetensors"))


def t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """difflm's time at the noise level σ: α(t) = 1 − t = e^{−σ}."""
    return -torch.expm1(-sigma.double())


def close_subs(ours: torch.Tensor, ref: torch.Tensor) -> None:
    live = ref > -1e5
    assert torch.equal(live, ours[..., :V] > -1e5)
    assert (ours[..., :V][live] - ref[live]).abs().max() < TOL


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


def test_mdlm(tmp):
    lm = convert("mdlm", published("mdlm_dit", tmp, "hub"), tmp)
    x = io("mdlm_dit")
    assert lm.process.family == "masked" and not lm.process.time_conditioning
    with torch.no_grad():
        logits = lm.model(x["input_ids"], sigma=x["sigma"])
        assert (logits[..., :V] - x["logits"]).abs().max() < TOL
        # the time-free pipeline feeds σ = 0, as MDLM does: row 0 of the fixture has σ = 0
        logp = lm.process.log_probs(lm.model, x["input_ids"][:1], None)
    close_subs(logp, x["subs_log_probs"][:1])


def test_sedd(tmp):
    lm = convert("sedd", published("sedd", tmp, "mixin"), tmp)
    x = io("sedd")
    ids, sigma = x["input_ids"], x["sigma"]
    assert lm.process.family == "sedd" and lm.process.graph.N == 50
    with torch.no_grad():
        raw = lm.model(ids, t_of_sigma(sigma).float())
        assert (raw[..., :V] - x["raw_output"]).abs().max() < TOL
        score = lm.process.log_score(lm.model, ids, t_of_sigma(sigma))
    masked = ids == 50  # only masked positions move under the absorbing graph; y ranges over data tokens
    assert (score[..., :50][masked] - x["log_score"][..., :50][masked]).abs().max() < TOL


def test_bd3lm_training_and_sampling_forward(tmp):
    from difflm.diffusion.block import block_causal

    lm = convert("bd3lm", published("bd3lm_dit", tmp, "hub"), tmp)
    x = io("bd3lm_dit")
    assert lm.process.family == "block" and lm.process.block_size == 4
    with torch.no_grad():
        train = lm.process.denoiser_logits(lm.model, x["train_xt"], x["train_x0"])
        ref_sigma = x["train_sigma"]
        direct = lm.model(torch.cat([x["train_xt"], x["train_x0"]], 1),
                          attn_mask=lm.process.training_mask(16), positions=torch.arange(16).repeat(2),
                          sigma=ref_sigma)[:, :16]
        assert (direct[..., :V] - x["train_logits"]).abs().max() < TOL
        zero = ref_sigma == 0  # the pipeline is time-free (σ = 0), as BD3-LM's default
        assert zero.any()
        assert (train[zero][..., :50] - x["train_logits"][zero][..., :50]).abs().max() < TOL
        assert torch.equal(lm.process.training_mask(16), x["train_attn_mask"])
        ids = x["sample_input_ids"]
        blk = torch.arange(ids.shape[1]) // 4
        assert torch.equal(block_causal(blk, blk), x["sample_attn_mask"])
        sample = lm.model(ids, attn_mask=block_causal(blk, blk), sigma=x["sample_sigma"])
        assert (sample[..., :V] - x["sample_logits"]).abs().max() < TOL


@pytest.mark.parametrize("kind", ["mdlm", "sedd", "bd3lm"])
def test_converted_models_sample_and_evaluate(tmp, kind):
    lm = DiffusionLM.from_pretrained(tmp / f"{kind}-converted")
    g = lm.generate(2, 16, steps=8, seed=0)
    assert g.tokens.shape == (2, 16) and not (g.tokens == 50).any()
    assert math.isfinite(lm.evaluate("valid", samples=1, max_batches=1).nelbo)


def test_a_lightning_checkpoint_uses_its_ema_weights(tmp):
    """MDLM's training checkpoints: ``backbone.`` keys under state_dict, the EMA shadow parameters (what the
    reference evaluates with) as a list in parameter order, the run config beside it."""
    ref = json.loads((ORACLES / "mdlm_dit.json").read_text())
    state = load_file(str(ORACLES / "mdlm_dit.safetensors"))
    shadow = [v for k, v in state.items() if k != "rotary_emb.inv_freq"]
    ckpt = tmp / "last.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": torch.zeros_like(v) if k != "rotary_emb.inv_freq" else v
                               for k, v in state.items()},
                "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow}}, ckpt)
    (tmp / "hydra.json").write_text(json.dumps(ref["config"]))
    out = tmp / "from-ckpt"
    r = subprocess.run([sys.executable, "-m", "difflm.cli", "convert", "--from", "mdlm", str(ckpt), str(out),
                        "--config", str(tmp / "hydra.json"), "--tokenizer", str(tokenizer_json(tmp / "tok.json"))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    x = io("mdlm_dit")
    with torch.no_grad():
        logits = DiffusionLM.from_pretrained(out).model(x["input_ids"], sigma=x["sigma"])
    assert (logits[..., :V] - x["logits"]).abs().max() < TOL


def test_bad_checkpoints_are_one_line_errors(tmp):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "difflm.cli", "convert", *args], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr

    src = published("mdlm_dit", tmp, "hub") if not (tmp / "mdlm_dit-hub").exists() else tmp / "mdlm_dit-hub"
    tok = tokenizer_json(tmp / "tokenizer.json")
    assert "not found" in run("--from", "mdlm", str(tmp / "nope"), str(tmp / "o1"), "--tokenizer", str(tok))
    assert "not empty" in run("--from", "mdlm", str(src), str(tmp / "mdlm-converted"), "--tokenizer", str(tok))
    small = tmp / "small.json"
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(small))
    assert "embedding has 51 rows" in run("--from", "mdlm", str(src), str(tmp / "o2"), "--tokenizer", str(small))
    llama = tmp / "llama"
    llama.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(51, 64)}, str(llama / "model.safetensors"))
    (llama / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    assert "hidden size" in run("--from", "mdlm", str(llama), str(tmp / "o3"), "--tokenizer", str(tok))


def test_duo_plumbing_on_a_uniform_state_layout(tmp):
    """DUO has no reference fixture: the MDLM fixture without its [MASK] row, as a uniform-state checkpoint, gives
    the MDLM network's logits on the data tokens, time-conditioned on σ = −log α(t)."""
    src = published("mdlm_dit", tmp, "hub") if not (tmp / "mdlm_dit-hub").exists() else tmp / "mdlm_dit-hub"
    duo = tmp / "duo-src"
    duo.mkdir()
    state = load_file(str(src / "model.safetensors"))
    for k in ("backbone.vocab_embed.embedding", "backbone.output_layer.linear.weight",
              "backbone.output_layer.linear.bias"):
        state[k] = state[k][:50].contiguous()
    save_file(state, str(duo / "model.safetensors"))
    (duo / "config.json").write_text((src / "config.json").read_text().replace('"vocab_size": 51', '"vocab_size": 50'))
    out = tmp / "duo-converted"
    r = subprocess.run([sys.executable, "-m", "difflm.cli", "convert", "--from", "duo", str(duo), str(out),
                        "--tokenizer", str(tokenizer_json(tmp / "tokenizer.json"))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lm, ref = DiffusionLM.from_pretrained(out), DiffusionLM.from_pretrained(tmp / "mdlm-converted")
    assert lm.process.family == "uniform" and lm.tokenizer.mask_id >= 50
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ours = lm.model(x, t)[..., :50]
        want = ref.model(x, sigma=-torch.log1p(-t))[..., :50]
    assert (ours - want).abs().max() < TOL
    assert lm.generate(1, 16, steps=4).tokens.max() < 50
