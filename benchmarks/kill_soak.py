"""Kill -9 soak: many training runs, each killed again and again — at random moments and at each file write of a
save (DIFFLM_KILL_AT, ``difflm.io.fault_point``) — and after every kill taken up again the way a user would
(``--resume`` when a checkpoint exists, else a fresh start). Each run must finish with the weights, checkpoint
tensors and metrics of an uninterrupted run, and after every kill the folder must be usable: it loads, or it
names the one command that repairs it, and the next start succeeds.

    python benchmarks/kill_soak.py --runs 6 --kills 120

Goal (issue 20): 0 unusable run folders and 100% bit-identical weights and metrics over ≥ 100 kills.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import markov  # noqa: E402
from conftest import markov_run  # noqa: E402

from difflm import runfolder  # noqa: E402
from difflm.errors import DiffLMError  # noqa: E402
from difflm.pipeline import DiffusionLM  # noqa: E402

WRITES = ["tokenizer.json", "checkpoint.safetensors", "model.safetensors", "config.json", "manifest.json"]
POINTS = [f"{w}:{m}" for w in WRITES for m in ("rename", "done")] + ["metrics.csv:row"]
DETERMINISTIC = ("step", "tokens", "loss", "lr", "grad_norm", "val_nelbo")


def launch(cfg: Path, out: Path, kill_at: str | None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFLM_KILL_AT", None)
    if kill_at:
        env["DIFFLM_KILL_AT"] = kill_at
    args = [sys.executable, "-m", "difflm.cli", "train", str(cfg), "--out", str(out), "--no-progress",
            "--set", "train.threads=1"]
    if (out / runfolder.CHECKPOINT).is_file():
        args.append("--resume")
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def usable(out: Path) -> tuple[bool, str]:
    """After a kill: the model folder loads, or there is none yet, or the error names the repair command."""
    if not (out / "model.safetensors").is_file():
        return True, "no model yet"
    try:
        DiffusionLM.from_pretrained(out, device="cpu")
        return True, "loads"
    except DiffLMError as e:
        return ("difflm export" in str(e)), str(e)


def metrics(out: Path) -> list[tuple]:
    with open(out / "metrics.csv", newline="") as f:
        return [tuple(r[k] for k in DETERMINISTIC) for r in csv.DictReader(f)]


def identical(a: Path, b: Path) -> dict:
    ca, cb = load_file(str(a / runfolder.CHECKPOINT)), load_file(str(b / runfolder.CHECKPOINT))
    return {"model": (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes(),
            "checkpoint": ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca),
            "metrics": metrics(a) == metrics(b)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6, help="at least this many runs (more until --kills is reached)")
    ap.add_argument("--kills", type=int, default=120, help="kills in all, each run aiming at --kills / --runs")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the summary here too")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    d = Path(tempfile.mkdtemp(prefix="kill-soak-"))
    P = markov.transition_matrix(0)
    markov.write_corpus(d / "train.txt", P, 4000, 16, 1)
    markov.write_corpus(d / "valid.txt", P, 400, 16, 2)
    run = markov_run(d, {"type": "masked"}, max_steps=a.steps, save_every=4, log_every=2, eval_every=10,
                     eval_batches=2, batch_size=16).to_dict()
    run["model"].update(n_layer=1, d_model=32, dropout=0.1)  # dropout: the RNG state must resume exactly too
    cfg = d / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(run))
    t0 = time.time()
    ref = d / "reference"
    p = launch(cfg, ref, None)
    assert p.wait() == 0, p.stderr.read()
    kills = {"timed": 0, "targeted": 0}
    unusable, failures, results = [], [], []
    r = 0
    while r < a.runs or kills["timed"] + kills["targeted"] < a.kills:  # each run is taken to completion
        out = d / f"run{r}"
        budget = a.kills // a.runs
        done = 0
        while True:
            targeted = done < budget and rng.random() < 0.5
            point = f"{rng.choice(POINTS)}:{rng.randint(1, 20)}" if targeted else None
            p = launch(cfg, out, point)
            if done < budget and not targeted:
                try:
                    p.wait(timeout=rng.uniform(1.5, 7.0))  # ~2 s of it is starting Python and torch
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
            code = p.wait()
            err = p.stderr.read()
            if code == 0:
                break
            if code != -9:
                failures.append({"run": r, "code": code, "stderr": err[-300:]})
                break
            done += 1
            kills["targeted" if targeted else "timed"] += 1
            ok, why = usable(out)
            if not ok:
                unusable.append({"run": r, "after": point or "timer", "why": why})
        results.append({"run": r, "kills": done, **identical(out, ref)})
        print(json.dumps(results[-1]), flush=True)
        r += 1
    total = kills["timed"] + kills["targeted"]
    same = sum(all(res[k] for k in ("model", "checkpoint", "metrics")) for res in results)
    summary = {"command": " ".join(["python", *sys.argv]), "date": str(date.today()),
               "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
               "kills": total, **kills, "runs": r, "unusable_folders": len(unusable),
               "failed_starts": len(failures), "runs_identical": same, "seconds": round(time.time() - t0),
               "unusable": unusable, "failures": failures}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
