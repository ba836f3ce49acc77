"""Classifier-guided control (Diffusion-LM §5): label-free attributes, the noisy-input classifier, and guided
sampling that reaches the attribute clearly more often than unguided sampling on the same model."""

import json
import shutil

import markov
import pytest
import torch
from conftest import MARKOV_L, one_line_error

from difflm.cli import main
from difflm.components import build_components
from difflm.config import RunConfig
from difflm.control import Attribute, ClassifierConfig, ClassifierGuidance, NoisyClassifier, control_table
from difflm.data import build_tokenizer
from difflm.errors import DiffLMError
from difflm.pipeline import DiffusionLM
from difflm.sampling import Conditioning, get_sampler


def test_attributes_read_the_text_up_to_its_end():
    tok = build_tokenizer(RunConfig.from_dict({"tokenizer": {"type": "char"}}).tokenizer, ["abc?d"])
    enc = lambda s: (tok.encode(s) + [tok.eos_id] + [tok.pad_id] * 4)[:8]  # noqa: E731
    rows = torch.tensor([enc("abc?"), enc("ab?c"), enc("dab")])
    assert Attribute.parse("endswith:?", tok)(rows).tolist() == [True, False, False]
    assert Attribute.parse("contains:b?", tok)(rows).tolist() == [False, True, False]
    assert Attribute.parse("startswith:ab", tok)(rows).tolist() == [True, True, False]
    tail = torch.tensor([tok.encode("ab") + [tok.eos_id] + tok.encode("c?")])  # after [EOS] is not the text
    assert Attribute.parse("endswith:?", tok)(tail).tolist() == [False]
    with pytest.raises(DiffLMError, match="unknown attribute"):
        Attribute.parse("rhymes:x", tok)


def test_guided_sampling_is_batch_invariant_and_keeps_given_tokens():
    run = RunConfig.from_dict({"data": {"seq_len": 8}, "model": {"n_layer": 1, "n_head": 2, "d_model": 32},
                               "process": {"type": "gaussian", "embed_dim": 8}})
    tok = build_tokenizer(run.tokenizer, ["a b c d e f g"])
    torch.manual_seed(0)
    model, process = build_components(run, tok)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    clf = NoisyClassifier(ClassifierConfig("endswith:a", 8, 8, 1, 2, 32)).eval()
    smp = get_sampler("ddpm", process, guide=ClassifierGuidance(clf, scale=2.0, lr=0.5, fluency=0.0))
    cond = Conditioning.unconditional(4, 8, fill=tok.mask_id)
    cond.tokens[:, 0], cond.fixed[:, 0] = tok.encode("c")[0], True
    full = smp(model.eval(), process, cond, steps=6, seed=3).tokens
    parts = [smp(model, process, cond.rows(slice(i, i + 1)), steps=6, seed=3, rows=torch.tensor([i])).tokens
             for i in range(4)]
    assert torch.equal(full, torch.cat(parts))
    assert (full[:, 0] == tok.encode("c")[0]).all()
    plain = get_sampler("ddpm", process)(model, process, cond, steps=6, seed=3).tokens
    assert not torch.equal(full, plain)  # the guide moved something
    idle = get_sampler("ddpm", process, guide=ClassifierGuidance(clf, scale=0.0))  # no classifier term: no move
    assert torch.equal(idle(model, process, cond, steps=6, seed=3).tokens, plain)


@pytest.mark.slow  # ~70 s on 2 cores (a classifier trained by the CLI, 200 guided samples); the guide's math: above
def test_classifier_guidance_reaches_the_attribute(markov_family_runs, tmp_path, capsys):
    """A Diffusion-LM model of the Markov source; 'ends with c' holds for ~10% of its lines. The classifier is
    trained by the CLI on the model's noisy embeddings; guided sampling must reach the attribute far more
    often than unguided sampling from the same model and seed, and still write the source's strings."""
    # the session's Diffusion-LM of the Markov source (test_families_known_distribution.py checks its bound); a copy,
    # since the classifier is written into the run folder
    shutil.copytree(markov_family_runs({"type": "gaussian", "embed_dim": 16, "loss": "elbo"}), tmp_path / "g")
    g = str(tmp_path / "g")
    assert main(["train-classifier", g, "--attribute", "endswith:c", "--steps", "300", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert 0.03 < stats["base_rate"] < 0.3 and stats["balanced_accuracy_t0.1"] > 0.8
    assert main(["control", g, "--classifier", stats["out"], "--num", "200", "--steps", "32", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["guided_success"] > row["unguided_success"] + 0.2, row
    # a sweep: one row per setting, all against the same unguided samples; weight 0 leaves them unchanged
    lm, clf = DiffusionLM.from_pretrained(g), NoisyClassifier.load(stats["out"])
    rows = control_table(lm, [("endswith:c", clf)], num=64, steps=8, guide_options=[{"scale": 0.0}, {"scale": 3.0}])
    assert [r["guide"] for r in rows] == [{"scale": 0.0}, {"scale": 3.0}]
    assert rows[0]["guided_success"] == rows[0]["unguided_success"] == rows[1]["unguided_success"]
    assert main(["sample", g, "--classifier", stats["out"], "--num", "50", "--steps", "32", "--json"]) == 0
    texts = json.loads(capsys.readouterr().out)["samples"]
    assert sum(len(t) == MARKOV_L and set(t) <= set(markov.ALPHABET) for t in texts) >= 0.9 * len(texts)
    # user mistakes: one line each
    assert main(["train-classifier", g, "--attribute", "contains:zz"]) == 2
    err = capsys.readouterr().err
    assert "never true in the training data" in err and one_line_error(err)
    assert main(["sample", g, "--classifier", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no attribute classifier" in err and one_line_error(err)


def test_classifier_pooling_round_trips_and_old_configs_load_as_mean(tmp_path):
    z, t = torch.randn(3, 8, 8), torch.rand(3)
    for pooling in ("attention", "mean"):
        torch.manual_seed(0)
        clf = NoisyClassifier(ClassifierConfig("endswith:a", 8, 8, 1, 2, 32, pooling)).eval()
        clf.save(tmp_path / pooling)
        assert torch.equal(NoisyClassifier.load(tmp_path / pooling)(z, t), clf(z, t))
    cfg = json.loads((tmp_path / "mean" / "classifier.json").read_text())
    del cfg["pooling"]  # written before the option existed
    (tmp_path / "mean" / "classifier.json").write_text(json.dumps(cfg))
    assert NoisyClassifier.load(tmp_path / "mean").cfg.pooling == "mean"
    with pytest.raises(DiffLMError, match="pooling"):
        NoisyClassifier(ClassifierConfig("endswith:a", 8, 8, 1, 2, 32, "max"))
