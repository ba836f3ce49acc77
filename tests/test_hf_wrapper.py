"""LLaDA- / Dream-style models through transformers (``difflm convert --from dream|llada``), checked on a tiny random
Llama-architecture model built here: the wrapper's logits are the model's under a bidirectional mask (shifted the
Dream way), every masked-family sampler and the evaluator run on it, the block sampler with its cache asked for
gives the tokens of recomputation, and the folder holds no copy of the weights."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from difflm.pipeline import DiffusionLM  # noqa: E402

V = 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("dream-tiny")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    vocab = {f"w{i}": i for i in range(V - 6)} | {"<|mask|>": V - 6, "<|endoftext|>": V - 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tok.json"))
    return d


def wrap(model_dir, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difflm.cli", "convert", "--from", "dream", str(model_dir), str(out),
                           "--tokenizer", str(model_dir / "tok.json"), "--eos-token", "<|endoftext|>",
                           "--seq-len", "16", *extra],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def dream(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "dream"
    r = wrap(model_dir, out, "--attention", "mask")
    assert r.returncode == 0, r.stderr
    return out


def test_logits_are_the_models_shifted_under_a_bidirectional_mask(model_dir, dream):
    lm = DiffusionLM.from_pretrained(dream)
    tok = lm.tokenizer
    assert (tok.mask_id, tok.eos_id) == (V - 6, V - 5)  # the model's own tokens, not added ones
    Vt = tok.vocab_size  # + [PAD] [BOS]: 58, inside the model's 60 rows
    assert (dream / "model.safetensors").stat().st_size < 1024  # the weights stay where they are
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.randint(0, V - 6, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=torch.ones(2, 1, 12, 12, dtype=torch.bool)).logits
        ref = torch.cat([ref[:, :1], ref[:, :-1]], 1)  # Dream's shift
        ours = lm.model(x)
    assert Vt == V - 2 and ours.shape[-1] == Vt
    assert torch.allclose(ours, ref[..., :Vt], atol=1e-5)


@pytest.mark.parametrize("sampler", ["ancestral", "cached", "first-hitting", "remdm", "confidence", "threshold"])
def test_every_masked_sampler_runs(dream, sampler):
    lm = DiffusionLM.from_pretrained(dream)
    g = lm.generate(2, 12, steps=6, sampler=sampler, seed=0)
    assert g.tokens.shape == (2, 12) and not (g.tokens == lm.tokenizer.mask_id).any()
    assert torch.equal(lm.generate(2, 12, steps=6, sampler=sampler, seed=0, batch_size=1).tokens, g.tokens)


def test_evaluate_and_infill(dream):
    lm = DiffusionLM.from_pretrained(dream)
    assert math.isfinite(lm.evaluate("valid", samples=1, max_batches=1).nelbo)
    assert lm.infill("w1 w2 ___ w5", span_tokens=2)[0].startswith("w1 w2")


def test_block_family_cache_falls_back_to_recomputation(model_dir, tmp_path):
    out = tmp_path / "block"
    r = wrap(model_dir, out, "--attention", "mask", "--family", "block")
    assert r.returncode == 0, r.stderr
    lm = DiffusionLM.from_pretrained(out)
    a = lm.generate(2, 12, steps=12, sampler="block", seed=0, sampler_options={"cache": True})
    b = lm.generate(2, 12, steps=12, sampler="block", seed=0, sampler_options={"cache": False})
    assert torch.equal(a.tokens, b.tokens)


def test_bad_wrapping_is_one_line(model_dir, tmp_path):
    r = wrap(model_dir, tmp_path / "n", "--family", "block")  # native attention cannot take block masks
    assert r.returncode == 2 and "model.attention mask" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = wrap(model_dir, tmp_path / "m", "--mask-token", "<nope>")
    assert r.returncode == 2 and "no token '<nope>'" in r.stderr
