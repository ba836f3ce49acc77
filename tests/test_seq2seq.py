"""Seq2seq: JSONL pairs, the row layout (source fixed, target + [EOS] fill modelled), the source never
changed by any sampler of any family, copy and reversal learned, text metrics against closed forms."""

import json
import random

import pytest
import torch
from conftest import TINY_PROCESSES, OnFirstUse
from hypothesis import given, settings
from hypothesis import strategies as st

from difflm.cli import main
from difflm.components import build_components
from difflm.config import RunConfig
from difflm.data import build_dataset, build_tokenizer, load_lines
from difflm.data.corpora import load_pairs
from difflm.errors import DiffLMError
from difflm.evaluation.text_metrics import bleu, dist_n, mbr_select, rouge_l, self_bleu, sentence_bleu
from difflm.pipeline import DiffusionLM
from difflm.sampling import Conditioning, get_sampler, sampler_fits, sampler_names

SRC_LEN = 5  # fixed source length: the target starts at the same offset in every row


def write_pairs(d, task: str, n_train: int = 3000) -> None:
    r = random.Random(0)
    for split, n in (("train", n_train), ("valid", 64), ("test", 64)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                src = [r.choice("abcdef") for _ in range(SRC_LEN)]
                tgt = src if task == "copy" else src[::-1]
                f.write(json.dumps({"source": " ".join(src), "target": " ".join(tgt)}) + "\n")


def pairs_run(d, process: dict, **train) -> RunConfig:
    t = {"batch_size": 64, "max_steps": 400, "lr": 3e-3, "warmup_steps": 40, "ema": 0.99, "eval_every": 10**6,
         "save_every": 10**6, "tensorboard": False, "bf16": False, "log_every": 100}
    t.update(train)
    return RunConfig.from_dict({
        "name": process["type"], "data": {"corpus": "pairs", "path": str(d), "seq_len": 2 * SRC_LEN + 2,
                                          "cache_dir": str(d / "cache")},
        "tokenizer": {"type": "word"}, "model": {"n_layer": 2, "n_head": 2, "d_model": 64},
        "process": process, "train": t, "sample": {"steps": 16},
    })


def test_pairs_rows_fix_the_source_and_model_the_target(tmp_path):
    write_pairs(tmp_path, "copy", 50)
    run = pairs_run(tmp_path, {"type": "masked"})
    assert run.data.mode == "pairs"  # implied by corpus: pairs
    tok = build_tokenizer(run.tokenizer, load_lines(run.data, "train"))
    data = build_dataset(run.data, tok, "train")
    b = data.batch([0, 1])
    L = 2 * SRC_LEN + 2
    assert b.tokens.shape == (2, L)
    assert (b.tokens[:, SRC_LEN] == tok.bos_id).all()
    assert b.fixed[:, : SRC_LEN + 1].all() and not b.fixed[:, SRC_LEN + 1 :].any()
    assert torch.equal(b.loss_mask, ~b.fixed)
    assert (b.tokens[:, -1] == tok.eos_id).all()  # the target ends with [EOS] fill
    src, tgt = load_pairs(run.data, "train")[0]
    assert tok.decode(b.tokens[0, :SRC_LEN].tolist()) == src == tgt


def test_pairs_errors_are_one_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"source": "a"}\n')
    run = pairs_run(tmp_path, {"type": "masked"})
    with pytest.raises(DiffLMError, match='line 1 needs string field'):
        load_pairs(run.data, "train")
    (tmp_path / "train.jsonl").write_text('{"source": "a", "target": "b"}\nnot json\n')
    with pytest.raises(DiffLMError, match="line 2 is not JSON"):
        load_pairs(run.data, "train")
    with pytest.raises(DiffLMError, match="valid.jsonl"):
        load_pairs(run.data, "valid")  # the folder has no valid.jsonl
    with pytest.raises(DiffLMError, match="data.mode pairs"):
        RunConfig.from_dict({"data": {"corpus": "pairs", "mode": "lines"}})


@pytest.mark.parametrize("family", sorted(TINY_PROCESSES))
def test_no_sampler_of_any_family_changes_the_source(tmp_path, family):
    write_pairs(tmp_path, "copy", 50)
    run = pairs_run(tmp_path, TINY_PROCESSES[family])
    tok = build_tokenizer(run.tokenizer, load_lines(run.data, "train"))
    model, process = build_components(run, tok)
    model.eval()
    x = build_dataset(run.data, tok, "test").batch(range(6)).tokens
    fixed = torch.zeros_like(x, dtype=torch.bool)
    fixed[:, : SRC_LEN + 1] = True
    cond = Conditioning(torch.where(fixed, x, torch.full_like(x, tok.mask_id)), fixed)
    fitting = [n for n in sampler_names() if sampler_fits(n, process)]
    assert fitting
    for name in fitting:
        out = get_sampler(name, process)(model, process, cond, steps=8, seed=1)
        assert torch.equal(out.tokens[fixed], x[fixed]), name
        assert not (out.tokens == tok.mask_id).any(), name


# copy is a constant relative offset (RoPE finds it in ~100 steps); reversal needs absolute positions, which a
# bidirectional RoPE model must infer, and takes the masked model ~1,000 steps here
LEARNED = {("copy", "masked"): (200, 0.0), ("reverse", "masked"): (1200, 0.0),
           ("reverse", "autoregressive"): (300, 0.0), ("copy-cfg", "masked"): (300, 0.3)}


def train_pairs(tmp_path_factory, key: tuple[str, str]) -> tuple:
    """The (task, family) pair model of LEARNED trained in a fresh folder: (folder, model)."""
    from difflm.training.trainer import Trainer

    task, family = key
    steps, drop = LEARNED[key]
    d = tmp_path_factory.mktemp(task)
    write_pairs(d, task.removesuffix("-cfg"))
    Trainer(pairs_run(d, {"type": family}, max_steps=steps, cond_dropout=drop), d / "run", progress=False).fit()
    return d, DiffusionLM.from_pretrained(d / "run", device="cpu")


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """(task, family) -> (folder, model), each trained on first use."""
    return OnFirstUse(lambda key: train_pairs(tmp_path_factory, key))


# the masked model's reversal (1,200 steps, ~30 s on 2 cores) runs in make test-slow; AR's and the masked copy stay
@pytest.mark.parametrize("task,family", [("copy", "masked"), pytest.param("reverse", "masked", marks=pytest.mark.slow),
                                         ("reverse", "autoregressive")])
def test_copy_and_reversal_are_learned(learned, task, family):
    d, lm = learned[task, family]
    pairs = load_pairs(lm.run.data, "test")
    outs = lm.generate_targets([s for s, _ in pairs], steps=16, seed=0, bf16=False)
    exact = sum(o.prediction == t for o, (_, t) in zip(outs, pairs)) / len(pairs)
    assert exact >= 0.95, (task, family, exact, [(o.source, o.prediction) for o in outs[:3]])


def test_generate_and_eval_metrics_through_the_cli(learned, tmp_path, capsys):
    d, lm = learned["copy", "masked"]
    assert main(["generate", str(d / "run"), "--source", "a b c d e", "--candidates", "3", "--json",
                 "--steps", "16", "--fp32"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["prediction"] == "a b c d e" and len(got["candidates"]) == 3
    assert main(["eval", str(d / "run"), "--split", "test", "--metrics", "bleu,rouge,dist,self-bleu",
                 "--candidates", "2", "--limit", "16", "--steps", "16", "--samples", "2", "--json"]) == 0
    g = json.loads(capsys.readouterr().out)["generation"]
    assert g["bleu"] > 90 and g["rouge_l"] > 95 and g["n"] == 16
    # a source longer than training kept is cut the same way (its first data.seq_len // 2 tokens), with a note
    assert main(["generate", str(d / "run"), "--source", " ".join("a" * 40), "--steps", "4", "--json"]) == 0
    io = capsys.readouterr()
    assert "as training cut them" in io.err and json.loads(io.out)["source"] == " ".join("a" * 40)
    assert main(["eval", str(d / "run"), "--metrics", "meteor"]) == 2
    assert "unknown --metrics" in capsys.readouterr().err


def test_classifier_free_guidance_mixes_the_conditional_and_unconditional_models(learned):
    """Trained with 30% of sources dropped: w = −1 is the unconditional model (the target no longer follows
    the source), w = 0 and w = 2 copy it."""
    d, lm = learned["copy-cfg", "masked"]
    pairs = load_pairs(lm.run.data, "test")
    srcs = [s for s, _ in pairs]

    def exact(w):
        outs = lm.generate_targets(srcs, steps=16, seed=0, bf16=False, guidance=w)
        return sum(o.prediction == t for o, (_, t) in zip(outs, pairs)) / len(pairs), outs

    assert exact(0.0)[0] >= 0.95 and exact(2.0)[0] >= 0.95
    free, outs = exact(-1.0)
    assert free < 0.2 and all(len(o.prediction.split()) >= 1 for o in outs)
    with pytest.raises(DiffLMError, match="cond_dropout"):
        learned["copy", "masked"][1].generate_targets(srcs[:1], guidance=1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_guidance_wrapper_is_the_linear_mix_and_keeps_a_separate_kv_cache(causal):
    from difflm.models import Transformer, TransformerConfig
    from difflm.models.transformer import KVCache
    from difflm.sampling.guidance import ClassifierFreeGuidance

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=12, max_len=10, causal=causal, n_layer=2, n_head=2,
                                          d_model=32)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randint(4, 12, (3, 10))
    source = torch.zeros(3, 10, dtype=torch.bool)
    source[:, :4] = True
    g = ClassifierFreeGuidance(model, source, null_id=0, w=1.5)
    with torch.no_grad():
        want = 2.5 * model(x) - 1.5 * model(torch.where(source, 0, x))
        assert torch.allclose(g(x), want, atol=1e-5)
        if causal:  # token by token through a cache: the unconditional stream must get its own
            cache = KVCache(2)
            steps = [g(x[:, :4], cache=cache)] + [g(x[:, i : i + 1], cache=cache) for i in range(4, 10)]
            assert torch.allclose(torch.cat(steps, 1), want, atol=1e-4)


# ---- text metrics ---------------------------------------------------------------------------------------
def test_rouge_l_and_dist_closed_forms():
    # LCS("a b c d", "a c d e") = 3: P = 3/4, R = 3/4, F = 0.75
    assert rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(75.0)
    assert rouge_l(["x y"], ["a b"]) == 0.0
    assert dist_n(["a a b", "a b"], 1) == pytest.approx(2 / 5)
    assert dist_n(["a a b", "a b"], 2) == pytest.approx(2 / 3)  # (a a), (a b), (a b)


def test_self_bleu_counts_every_ordered_pair():
    c = ["the cat sat on the mat in the sun today", "the cat sat on the mat", "the cat sat"]
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    assert self_bleu(c) == pytest.approx(bleu([c[i] for i, _ in pairs], [c[j] for _, j in pairs]))
    half = [(i, j) for i, j in pairs if i < j]  # long hypotheses vs short references only: not the same
    assert self_bleu(c) != pytest.approx(bleu([c[i] for i, _ in half], [c[j] for _, j in half]))
    assert self_bleu(["same words here and there"] * 3) == pytest.approx(100.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["a b c d e", "a b c d f", "x y z w v", "a b c x e"]), min_size=2, max_size=5))
def test_mbr_picks_the_candidate_closest_to_the_others(cands):
    i = mbr_select(cands)
    gain = [sum(sentence_bleu(cands[k], cands[j]) for j in range(len(cands)) if j != k) for k in range(len(cands))]
    assert gain[i] == max(gain)
