"""A run folder a kill cannot break: a kill timed to each write of a save (tokenizer, checkpoint, model,
config, manifest, metrics) leaves a folder that --resume (or a fresh start, before the first checkpoint)
takes to completion with weights and metrics bit-identical to an uninterrupted run; readers check the manifest;
one writer at a time; --resume refuses a changed config. (The long version: benchmarks/kill_soak.py.)"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import markov_run, one_line_error
from safetensors.torch import load_file

from difflm import runfolder
from difflm.cli import main
from difflm.errors import DiffLMError
from difflm.pipeline import DiffusionLM

STEPS, SAVE = 12, 4
#: columns of metrics.csv that must match an uninterrupted run exactly (the others are timings)
DETERMINISTIC = ("step", "tokens", "loss", "lr", "grad_norm", "val_nelbo")


def write_config(tmp: Path, d: Path, **train) -> Path:
    run = markov_run(d, {"type": "masked"}, max_steps=STEPS, save_every=SAVE, log_every=2, eval_every=6,
                     eval_batches=2, batch_size=16, **train)
    cfg = run.to_dict()
    cfg["model"].update(n_layer=1, d_model=32)
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def train(cfg: Path, out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFLM_KILL_AT", None)
    if kill_at:
        env["DIFFLM_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "difflm.cli", "train", str(cfg), "--out", str(out), "--no-progress",
                           "--set", "train.threads=1", *extra], env=env, capture_output=True, text=True, timeout=300)


def metrics(out: Path) -> list[tuple]:
    with open(out / "metrics.csv", newline="") as f:
        return [tuple(r[k] for k in DETERMINISTIC) for r in csv.DictReader(f)]


def finish(cfg: Path, out: Path) -> None:
    """What a user does after a kill: --resume when a checkpoint exists, else start again."""
    has_ckpt = (out / runfolder.CHECKPOINT).is_file()
    r = train(cfg, out, "--resume") if has_ckpt else train(cfg, out)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, markov_corpus):
    d, _ = markov_corpus
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp, d)
    r = train(cfg, tmp / "full")
    assert r.returncode == 0, r.stderr
    return cfg, tmp / "full"


# every write of a save, at its most dangerous moments: the temp file complete but not renamed, and just after
# (benchmarks/kill_soak.py covers every point at random counts; these are the one-per-write short version)
# (about 8 s each: the default run keeps the three writes of a save's model, the rest run in make test-slow)
_SLOW = pytest.mark.slow
KILLS = [pytest.param("tokenizer.json:rename:1", marks=_SLOW), "checkpoint.safetensors:rename:2",
         "model.safetensors:done:2", pytest.param("config.json:done:3", marks=_SLOW), "manifest.json:rename:2",
         pytest.param("metrics.csv:row:3", marks=_SLOW)]


@pytest.mark.parametrize("kill_at", KILLS)
def test_a_kill_at_each_write_resumes_to_the_same_run(reference, tmp_path, kill_at, capsys):
    cfg, full = reference
    out = tmp_path / "cut"
    r = train(cfg, out, kill_at=kill_at)
    assert r.returncode == -9, (kill_at, r.returncode, r.stderr[-500:])  # it was killed where asked
    # right after the kill the folder is either loadable or says exactly what to run
    if (out / "model.safetensors").is_file():
        try:
            DiffusionLM.from_pretrained(out, device="cpu")
        except DiffLMError as e:
            assert "difflm export" in str(e) or "difflm train" in str(e), str(e)
    finish(cfg, out)
    assert not list(out.glob(".*.tmp*")) and not (out / runfolder.LOCK).exists()
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (out / f).read_bytes() == (full / f).read_bytes(), (kill_at, f)
    a, b = load_file(str(out / runfolder.CHECKPOINT)), load_file(str(full / runfolder.CHECKPOINT))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kill_at  # (its metadata has timings)
    assert metrics(out) == metrics(full), kill_at
    m = runfolder.read_manifest(out)
    assert m["step"] == STEPS
    assert runfolder.inconsistent_files(out, m, (runfolder.CHECKPOINT, *runfolder.MODEL_FILES)) == []
    DiffusionLM.from_pretrained(out, device="cpu").generate(2, steps=4)


def test_readers_check_the_manifest_and_export_repairs(reference, tmp_path, capsys):
    cfg, full = reference
    out = tmp_path / "run"
    shutil.copytree(full, out)
    # an older model.safetensors under a newer manifest: what a kill between the two writes would leave
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    assert main(["sample", str(out), "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and "model.safetensors" in err and f"difflm export {out}" in err
    assert main(["export", str(out)]) == 0
    capsys.readouterr()
    assert (out / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert main(["sample", str(out), "--num", "1", "--steps", "2"]) == 0
    assert main(["eval", str(out), "--samples", "1", "--max-batches", "1"]) == 0
    assert "K=1: one time sample has no interval" in capsys.readouterr().out
    (out / runfolder.MANIFEST).write_text("{not json")
    assert main(["eval", str(out)]) == 2
    assert "manifest.json is corrupted" in capsys.readouterr().err


def test_a_model_folder_copy_is_whole_or_refused(reference, tmp_path):
    """copy_model_folder (a snapshot of a run that trains on): the copy loads and generates as the original does; a
    source whose files do not match its manifest is refused and leaves the previous copy as it was."""
    cfg, full = reference
    dest = tmp_path / "snap"
    runfolder.copy_model_folder(full, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*runfolder.MODEL_FILES, runfolder.MANIFEST])
    a = DiffusionLM.from_pretrained(full, device="cpu").generate(2, steps=4, seed=5).texts
    assert DiffusionLM.from_pretrained(dest, device="cpu").generate(2, steps=4, seed=5).texts == a
    bad = tmp_path / "bad"
    shutil.copytree(full, bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    before = (dest / "model.safetensors").read_bytes()
    with pytest.raises(DiffLMError, match="model.safetensors differs"):
        runfolder.copy_model_folder(bad, dest)
    assert (dest / "model.safetensors").read_bytes() == before


def test_one_writer_per_run_folder(reference, tmp_path, capsys):
    cfg, full = reference
    out = tmp_path / "run"
    shutil.copytree(full, out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / runfolder.LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert main(["train", str(cfg), "--out", str(out), "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert one_line_error(err) and f"pid {sleeper.pid}" in err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # the owner is gone: the lock is stale and replaced; temp files of killed writes are removed
    (out / ".model.safetensors.tmp99999").write_bytes(b"partial")
    r = train(cfg, out, "--resume", "--set", f"train.max_steps={STEPS + 2}")
    assert r.returncode == 0, r.stderr
    assert not (out / runfolder.LOCK).exists() and not (out / ".model.safetensors.tmp99999").exists()


def test_resume_refuses_a_changed_config_unless_allowed(reference, tmp_path, capsys):
    cfg, full = reference
    out = tmp_path / "run"
    shutil.copytree(full, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for change, keys in ((["process={type: autoregressive}"], "process.type"),
                         (["data.seq_len=9", "train.seed=3"], "data.seq_len"), (["train.lr=0.01"], "train.lr")):
        sets = [x for c in change for x in ("--set", c)]
        assert main(["train", str(cfg), "--out", str(out), "--resume", "--no-progress", *sets]) == 2
        err = capsys.readouterr().err
        assert one_line_error(err) and keys in err and "--allow-change" in err, err
        if len(change) == 2:
            assert "train.seed" in err  # every differing key is named
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # resumable changes need nothing; others are accepted with --allow-change and recorded
    assert main(["train", str(out), "--resume", "--no-progress", "--set", f"train.max_steps={STEPS + 2}",
                 "--set", "train.lr=0.004", "--allow-change", "train.lr"]) == 0
    rec = [json.loads(x) for x in (out / runfolder.CHANGES).read_text().splitlines()]
    assert rec == [{"step": STEPS, "changes": {"train.lr": {"was": 0.003, "now": 0.004}}}]
    assert DiffusionLM.from_pretrained(out, device="cpu").run.train.max_steps == STEPS + 2


def test_fresh_start_and_overwrite_clear_the_old_logs(reference, tmp_path):
    cfg, full = reference
    out = tmp_path / "run"
    shutil.copytree(full, out)
    (out / "tb").mkdir(exist_ok=True)
    (out / "tb" / "events.old").write_text("x")
    r = train(cfg, out)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = train(cfg, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert metrics(out) == metrics(full) and not (out / "tb" / "events.old").exists()
