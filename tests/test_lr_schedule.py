"""The learning-rate schedule: warmup, then cosine decay over max_steps or over training time (train.decay_minutes)."""

import csv
import math
from types import SimpleNamespace

import pytest
from conftest import markov_run

from difflm.training.trainer import Trainer, lr_at


def _cfg(**kw):
    c = {"lr": 2e-3, "min_lr_ratio": 0.1, "warmup_steps": 10, "max_steps": 110, "decay_minutes": None}
    c.update(kw)
    return SimpleNamespace(**c)


def test_lr_at_closed_forms():
    c = _cfg()
    assert lr_at(0, c) == pytest.approx(2e-4) and lr_at(9, c) == pytest.approx(2e-3)  # linear warmup
    assert lr_at(10, c) == pytest.approx(2e-3)
    assert lr_at(60, c) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))  # half way: cos(π/2) = 0
    assert lr_at(110, c) == pytest.approx(2e-4) and lr_at(500, c) == pytest.approx(2e-4)
    t = _cfg(decay_minutes=2.0)
    assert lr_at(3, t, 1e6) == pytest.approx(lr_at(3, c))  # warmup is still counted in steps
    # after warmup the step and max_steps no longer matter, only the clock
    for step in (10, 60, 10**6):
        assert lr_at(step, t, 0.0) == pytest.approx(2e-3)
        assert lr_at(step, t, 30.0) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
        assert lr_at(step, t, 60.0) == pytest.approx(2e-3 * 0.55)
        assert lr_at(step, t, 120.0) == pytest.approx(2e-4) and lr_at(step, t, 1e4) == pytest.approx(2e-4)


def test_training_decays_over_its_own_clock(tmp_path, markov_corpus):
    """A real run with decay_minutes: every logged LR lies between the schedule at the two clock readings that
    bracket the step it was set for, and the run ends at the floor. (A clock that never advanced would keep the
    peak rate, and a step-based decay would not move over max_steps = 10⁶.)"""
    d, _ = markov_corpus
    run = markov_run(d, {"type": "masked"}, max_steps=10**6, max_minutes=0.02, decay_minutes=0.01, batch_size=8,
                     warmup_steps=2, log_every=1, lr=1e-3)
    Trainer(run, tmp_path / "run", progress=False).fit()
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["lr"]]
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(1, len(rows) + 1)) and len(rows) > 10
    lr = [float(r["lr"]) for r in rows]
    el = [float(r["elapsed_s"]) for r in rows]
    t = run.train
    assert lr[0] == pytest.approx(5e-4) and lr[1] == pytest.approx(1e-3)  # warmup
    # the LR of step k (row k) was set from the clock read after step k - 1: after row k - 2 was logged, before
    # row k - 1 was
    for k in range(3, len(rows)):
        assert lr_at(k, t, el[k - 1]) - 1e-12 <= lr[k] <= lr_at(k, t, el[k - 2]) + 1e-12, k
    assert el[-1] >= 60 * 0.02 and lr[-1] == pytest.approx(1e-4)
    assert any(1.1e-4 < x < 0.9e-3 for x in lr)  # it passed through the decay, not straight to the floor
