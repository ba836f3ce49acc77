"""Run folders saved by difflm before the family/sampler/backbone registries (tests/fixtures/legacy_runs, made
by make_legacy_runs.py at commit 37279ff) still load, and reproduce the samples and bounds they gave then."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difflm.pipeline import DiffusionLM

LEGACY = Path(__file__).parent / "fixtures" / "legacy_runs"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_legacy_run_loads_and_reproduces(family):
    lm = DiffusionLM.from_pretrained(LEGACY / family, device="cpu")
    assert lm.process.family == family
    g = lm.generate(3, 24, seed=7, bf16=False)
    assert g.texts == EXPECTED[family]["samples"]
    assert g.nfe.tolist() == EXPECTED[family]["nfe"]
    nats = [s["nats"] for s in lm.score(["the cat sat", "a good day"], n_samples=4, seed=3)]
    assert nats == EXPECTED[family]["nats"]  # same arithmetic, same order: bit for bit
