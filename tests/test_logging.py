"""Training logs: metrics.csv and TensorBoard event files hold the same numbers."""

import csv

import pytest
from conftest import markov_run

from difflm.training.trainer import Trainer


def test_tensorboard_events_match_csv(tmp_path, markov_corpus):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    d, _ = markov_corpus
    run = markov_run(d, {"type": "masked"}, max_steps=10, batch_size=16, log_every=2, eval_every=5,
                     eval_batches=2, tensorboard=True)
    Trainer(run, tmp_path / "run", progress=False).fit()
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss = {int(r["step"]): float(r["loss"]) for r in rows if r["loss"]}
    val = {int(r["step"]): float(r["val_nelbo"]) for r in rows if r["val_nelbo"]}
    assert sorted(loss) == [2, 4, 6, 8, 10] and sorted(val) == [5, 10]
    acc = ea.EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_nelbo"} <= set(acc.Tags()["scalars"])
    tb_loss = {e.step: e.value for e in acc.Scalars("loss")}
    tb_val = {e.step: e.value for e in acc.Scalars("val_nelbo")}
    assert tb_loss.keys() == loss.keys() and tb_val.keys() == val.keys()
    for k in loss:
        assert tb_loss[k] == pytest.approx(loss[k], rel=1e-6)
    for k in val:
        assert tb_val[k] == pytest.approx(val[k], rel=1e-6)
