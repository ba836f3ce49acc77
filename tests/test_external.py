"""The pretrained-LM scorer (evaluation.external) on a tiny random Llama saved as a transformers directory."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from difflm.errors import DiffLMError  # noqa: E402
from difflm.evaluation.external import load_scorer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", "\n", "."]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=128, eos_token_id=1, bos_token_id=1, pad_token_id=1)
    d = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


def test_batched_padded_nll_equals_scoring_each_text_alone(tiny_lm_dir):
    scorer = load_scorer(str(tiny_lm_dir))
    texts = ["the cat sat.", "a", "", "hello there\nsecond line", "zzzz zzzz zzzz zzzz zzzz"]
    total, n = scorer.nll(texts, batch_size=3)  # right padding inside each batch of 3
    ref_total, ref_n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([scorer.encode(t)])
            logp = torch.log_softmax(scorer.model(input_ids=ids).logits[0, :-1].double(), -1)
            ref_total += float(-logp.gather(-1, ids[0, 1:, None]).sum())
            ref_n += ids.shape[1] - 1
    assert n == ref_n == sum(len(t) for t in texts)  # one token per character, separator unscored
    assert total == pytest.approx(ref_total, rel=1e-6)
    assert scorer.perplexity(texts) == pytest.approx(math.exp(ref_total / ref_n), rel=1e-6)


def test_bench_sampling_adds_the_scorer_column(markov_models, tiny_lm_dir, capsys):
    from difflm.cli import main

    models, P, H, d = markov_models
    args = ["bench-sampling", str(d / "masked"), "--ar", str(d / "ar"), "--samplers", "ancestral", "--steps", "8",
            "--num", "4", "--scorer", str(tiny_lm_dir)]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scorer"] == tiny_lm_dir.name
    (row,) = out["rows"]
    assert math.isfinite(row["scorer_ppl"]) and row["scorer_ppl"] > 1 and math.isfinite(row["gen_ppl"])
    assert main(args) == 0
    assert f"gen. perplexity ({tiny_lm_dir.name})" in capsys.readouterr().out


def test_scorer_errors_are_one_line(tmp_path):
    with pytest.raises(DiffLMError, match="not found"):
        load_scorer(str(tmp_path / "nowhere"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(DiffLMError, match="not a .gguf file"):
        load_scorer(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffLMError, match="cannot (load|read) .*empty"):
        load_scorer(str(tmp_path / "empty"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(DiffLMError):
        load_scorer(str(tmp_path / "broken.gguf"))
