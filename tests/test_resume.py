"""Kill a training run mid-way, resume it, and get exactly the weights of an uninterrupted run."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import markov_run
from safetensors.torch import load_file

from difflm.training.checkpoint import read_safetensors

STEPS = 60


def _config(tmp: Path, d: Path) -> Path:
    run = markov_run(d, {"type": "masked"}, max_steps=STEPS, save_every=10, log_every=5, batch_size=32)
    cfg = run.to_dict()
    cfg["model"]["dropout"] = 0.1  # dropout draws from the RNG: resume must restore its state too
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train(cfg: Path, out: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "difflm.cli", "train", str(cfg), "--out", str(out),
                             "--no-progress", "--set", "train.threads=1", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _ckpt_step(out: Path) -> int:
    try:
        import json

        _, meta = read_safetensors(out / "checkpoint.safetensors")
        return json.loads(meta["state"])["step"]
    except Exception:
        return 0


def test_resume_after_kill_is_exact(tmp_path, markov_corpus):
    d, _ = markov_corpus
    cfg = _config(tmp_path, d)
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = _train(cfg, full)
    q = _train(cfg, cut)
    deadline = time.time() + 240
    while _ckpt_step(cut) < 30 and time.time() < deadline and q.poll() is None:
        time.sleep(0.05)
    assert q.poll() is None, "the run finished before it could be killed"
    q.send_signal(signal.SIGKILL)
    q.wait()
    killed_at = _ckpt_step(cut)
    assert 30 <= killed_at < STEPS
    r = _train(cfg, cut, "--resume")
    assert r.wait(timeout=300) == 0, r.stderr.read().decode()
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = load_file(str(full / "checkpoint.safetensors")), load_file(str(cut / "checkpoint.safetensors"))
    for k in ca:
        assert torch.equal(ca[k], cb[k]), k
    with open(cut / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no duplicate rows from the killed run
