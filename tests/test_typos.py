"""Typo pairs for the edit family's correction task: deterministic in the seed, real misspellings taken from
codespell's dictionary, keyboard typos one edit away, word-change rates as set (binomial bounds)."""

from __future__ import annotations

import importlib.util
import json
import math
import random

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("codespell_lib") is None, reason="pip install codespell")


def test_pairs_are_deterministic_and_rates_hold():
    from difflm.data.typos import add_typos, make_pairs, misspellings

    lines = ["the company said the government will receive the money in the third quarter"] * 400
    a, b = make_pairs(lines, 1), make_pairs(lines, 1)
    assert a == b and make_pairs(lines, 2) != a
    assert all(p["target"] == lines[0] for p in a)
    words = lines[0].split()
    known = sum(w in misspellings() for w in words if len(w) > 1)
    eligible = sum(len(w) > 1 for w in words)
    changed = sum(add_typos(lines[0], random.Random(i), 0.1, 0.05)[1] for i in range(400))
    mean = 400 * (0.1 * known + 0.05 * eligible)  # a real misspelling where known, else (or after) a keyboard typo
    hi = 400 * (0.15 * eligible)
    assert 0.5 * mean < changed < hi + 4 * math.sqrt(hi)


def test_typos_are_real_misspellings_or_one_keyboard_edit():
    from difflm.data.typos import add_typos, misspellings
    from difflm.diffusion.edits import levenshtein

    table = misspellings()
    assert "recieve" in table["receive"]
    rng = random.Random(0)
    for _ in range(200):
        noisy, _ = add_typos("we will receive the money", rng, 0.3, 0.3)
        for w, n in zip("we will receive the money".split(), noisy.split()):
            if w != n:
                assert n in table.get(w, ()) or levenshtein(list(w), list(n)) <= 2  # a swap is two substitutions


def test_cli_writes_jsonl(tmp_path):
    from difflm.data.typos import main

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line number {i} says hello to the world" for i in range(50)))
    assert main(["--corpus", "text", "--path", str(text), "--out", str(tmp_path / "o")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "o" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"source", "target"}


def test_copies_keep_copy_0_and_draw_fresh_typos(tmp_path):
    from difflm.data.typos import main, make_pairs

    lines = [f"the company will receive the money from {w} in the quarter" for w in ("banks", "funds", "traders")]
    one, three = make_pairs(lines, 5), make_pairs(lines, 5, 0.3, 0.3, copies=3)
    assert make_pairs(lines, 5, copies=3)[:3] == one  # copy 0 is the one-copy output
    assert [p["target"] for p in three] == lines * 3
    assert len({p["source"] for p in three}) > 3  # later copies draw other typos
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line number {i} says hello to the world" for i in range(50)))
    assert main(["--corpus", "text", "--path", str(text), "--out", str(tmp_path / "o"), "--copies", "2"]) == 0
    lengths = {s: len((tmp_path / "o" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "valid", "test")}
    assert lengths == {"train": 80, "valid": 5, "test": 5}


def test_train_rates_change_the_training_pairs_only(tmp_path):
    from difflm.data.typos import main
    from difflm.diffusion.edits import levenshtein

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"the company will receive the money from the banks in quarter {i}" for i in range(400)))
    base, dense = tmp_path / "base", tmp_path / "dense"
    assert main(["--corpus", "text", "--path", str(text), "--out", str(base)]) == 0
    assert main(["--corpus", "text", "--path", str(text), "--out", str(dense), "--train-real", "0.3",
                 "--train-char", "0.15"]) == 0

    def read(folder, split):
        return [json.loads(x) for x in (folder / f"{split}.jsonl").read_text().splitlines()]

    assert read(base, "valid") == read(dense, "valid") and read(base, "test") == read(dense, "test")
    settings = json.loads((dense / "typos.json").read_text())
    assert [settings[k] for k in ("real", "char", "train_real", "train_char")] == [0.1, 0.05, 0.3, 0.15]
    assert json.loads((base / "typos.json").read_text())["train_real"] == 0.1

    def changed(rows):
        return sum(levenshtein(r["source"].split(), r["target"].split()) for r in rows)

    # about three times the changed words (a word's chance: 0.15 → 0.45), far from the bound at 2× on 400 lines
    assert changed(read(dense, "train")) > 2 * changed(read(base, "train")) > 0


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys):
    import subprocess
    import sys

    from difflm.data.typos import _cli

    for args, words in ((["--train-real", "2"], "--train-real is a share of words"),
                        (["--copies", "0"], "--copies must be at least 1"),
                        (["--corpus", "text"], "--corpus text needs --path")):
        assert _cli(["--out", str(tmp_path / "o"), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("difflm: error: ") and words in lines[0]
    r = subprocess.run([sys.executable, "-m", "difflm.data.typos", "--out", str(tmp_path / "o"), "--real", "-1"],
                       capture_output=True, text=True)  # the module's entry point exits with _cli's code
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "difflm: error: --real is a share of words: give a number from 0 to 1, not -1"]
    assert not (tmp_path / "o").exists()
