"""A user's mistake gets a one-line error that names the problem and the fix, and exit code 2."""

import json
import subprocess
import sys

import pytest
from conftest import markov_run, one_line_error

from difflm.cli import main
from difflm.config import load_config
from difflm.errors import DiffLMError


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def test_missing_model_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "sample", str(tmp_path / "nope"))
    assert code == 2 and one_line_error(err) and "does not exist" in err


def test_folder_without_model(capsys, tmp_path):
    code, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2 and one_line_error(err) and "no model.safetensors" in err


def test_corrupted_checkpoint_and_model(capsys, markov_models, tmp_path):
    import shutil

    models, P, H, d = markov_models
    bad = tmp_path / "bad"
    shutil.copytree(d / "masked", bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    code, err = run_cli(capsys, "sample", str(bad))
    assert code == 2 and one_line_error(err) and "corrupted" in err
    # a damaged training checkpoint refuses --resume and leaves the file as it was
    raw = (bad / "checkpoint.safetensors").read_bytes()[:1000]
    (bad / "checkpoint.safetensors").write_bytes(raw)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(markov_run(d, {"type": "masked"}).to_dict()))
    code, err = run_cli(capsys, "train", str(cfg), "--out", str(bad), "--resume", "--no-progress")
    assert code == 2 and one_line_error(err) and "corrupted" in err
    assert (bad / "checkpoint.safetensors").read_bytes() == raw


def test_training_never_overwrites_a_run(capsys, markov_models, tmp_path):
    models, P, H, d = markov_models
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(markov_run(d, {"type": "masked"}).to_dict()))
    before = (d / "masked" / "checkpoint.safetensors").read_bytes()
    code, err = run_cli(capsys, "train", str(cfg), "--out", str(d / "masked"), "--no-progress")
    assert code == 2 and one_line_error(err) and "--resume" in err
    assert (d / "masked" / "checkpoint.safetensors").read_bytes() == before
    code, err = run_cli(capsys, "train", str(cfg), "--out", str(tmp_path / "fresh"), "--resume")
    assert code == 2 and one_line_error(err) and "not found" in err


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"\n\n  \n", "empty"),
                                            (b"caf\xe9 au lait\n" * 50, "not UTF-8")])
def test_bad_corpus(capsys, tmp_path, content, needle):
    f = tmp_path / "corpus.txt"
    f.write_bytes(content)
    code, err = run_cli(capsys, "train", "shakespeare-char-mdlm", "--set", f"data.path={f}", "--out",
                        str(tmp_path / "o"), "--no-progress")
    assert code == 2 and one_line_error(err) and needle in err


def test_missing_corpus_path(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "shakespeare-char-mdlm", "--set", f"data.path={tmp_path}/x.txt",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and one_line_error(err) and "does not exist" in err


def test_prompt_longer_than_the_model(capsys, markov_models):
    models, P, H, d = markov_models
    code, err = run_cli(capsys, "infill", str(d / "masked"), "abcabcabcabcabcabcabc [MASK]")
    assert code == 2 and one_line_error(err) and "shorten" in err
    code, err = run_cli(capsys, "sample", str(d / "ar"), "--prompt", "ab" * 20)
    assert code == 2 and one_line_error(err) and "shorten" in err


def test_wrong_sampler(capsys, markov_models):
    models, P, H, d = markov_models
    code, err = run_cli(capsys, "sample", str(d / "ar"), "--sampler", "cached")
    assert code == 2 and one_line_error(err) and "does not fit" in err
    with pytest.raises(DiffLMError, match="--candidates must be at least 1"):
        models["ar"].infill("ab[MASK]cd", candidates=0)
    # a preset's sample.sampler that does not fit a swapped-in family is a preference, not an error
    ar = models["ar"]
    ar.run.sample.sampler = "ancestral"
    try:
        assert len(ar.generate(2, steps=4, seed=0).texts) == 2
    finally:
        ar.run.sample.sampler = None


def test_mismatched_tokenizer(capsys, markov_models, tmp_path):
    import shutil

    from difflm.data.tokenizers import train_char

    models, P, H, d = markov_models
    bad = tmp_path / "m"
    shutil.copytree(d / "masked", bad)
    train_char(["xyz0123456789"]).save(bad / "tokenizer.json")
    code, err = run_cli(capsys, "sample", str(bad))
    assert code == 2 and one_line_error(err) and "tokenizer.json differs from what the run's manifest recorded" in err
    (bad / "manifest.json").unlink()  # a folder without a manifest (saved before them): the tokenizer check
    code, err = run_cli(capsys, "sample", str(bad))
    assert code == 2 and one_line_error(err) and "does not match" in err


def test_bad_config_keys(capsys, tmp_path):
    from difflm.errors import DiffLMError

    with pytest.raises(DiffLMError, match="unknown config key"):
        load_config("ptb-mdlm-small", ["train.learning_rate=1"])
    with pytest.raises(DiffLMError, match="must be an integer"):
        load_config("ptb-mdlm-small", ["train.max_steps=1.5"])
    with pytest.raises(DiffLMError, match="train.lr must be a number"):
        load_config("ptb-mdlm-small", ["train.lr=fast"])
    assert load_config("ptb-mdlm-small", ["train.lr=2e-3"]).train.lr == 0.002  # YAML 1.1 reads 2e-3 as a string
    code, err = run_cli(capsys, "train", "no-such-preset")
    assert code == 2 and one_line_error(err) and "not found" in err


def test_bad_sample_options_fail_when_the_config_is_read(capsys):
    """A typo in ``sample.sampler`` or ``sample.options`` is a one-line error when the config is read (before hours
    of training), checked against the options of the sampler that the config's own family would run."""
    from difflm.errors import DiffLMError

    with pytest.raises(DiffLMError, match="sample.options of sampler 'autoregressive' has no option grredy"):
        load_config("captions-ar", ["sample.options={grredy: true}"])
    with pytest.raises(DiffLMError, match="sample.sampler 'autoregresive' is not a sampler"):
        load_config("captions-ar", ["sample.sampler=autoregresive"])
    # one name, different samplers per family: DDIM's eta is an option of the Gaussian family's ddim only
    assert load_config("captions-gaussian", ["sample.sampler=ddim", "sample.options={eta: 0.5}"]).sample.options
    with pytest.raises(DiffLMError, match="eta must be"):
        load_config("captions-gaussian", ["sample.sampler=ddim", "sample.options={eta: -1}"])
    # a swapped family runs its own default sampler and ignores the preset's
    assert load_config("captions-ar", ["process.type=masked"]).sample.options == {"greedy": True}
    code, err = run_cli(capsys, "train", "captions-ar", "--set", "sample.options={grredy: true}")
    assert code == 2 and one_line_error(err) and "grredy" in err


def test_no_traceback_through_the_real_entry_point(tmp_path):
    p = subprocess.run([sys.executable, "-m", "difflm.cli", "eval", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and one_line_error(p.stderr)


def test_left_to_right_eval_of_a_model_that_cannot_decode_that_way(capsys, markov_models):
    """--left-to-right is exact only for a clean-causal shifted masked model: a full-attention masked model and
    an AR model are each refused in one line naming what it needs."""
    models, P, H, d = markov_models
    code, err = run_cli(capsys, "eval", str(d / "masked"), "--left-to-right", "--fp32")
    assert code == 2 and one_line_error(err) and "process.attention clean-causal" in err
    code, err = run_cli(capsys, "eval", str(d / "ar"), "--left-to-right", "--fp32")
    assert code == 2 and one_line_error(err) and "clean-causal masked and block models" in err
