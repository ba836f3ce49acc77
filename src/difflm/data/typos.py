"""Spelling and typo correction pairs (noisy → clean) for edit-based revision (the edit family's first task).

Noise, per word of a clean sentence, seeded and deterministic:
* with probability ``real`` a word that people really misspell is replaced by one of its misspellings, from
  codespell's dictionary (``pip install codespell``, or Debian's ``codespell``), inverted: correction → the
  misspellings that map only to it (entries with several candidate corrections are left out);
* else, with probability ``char``, one character typo: insert a neighbouring key, delete a character, swap two
  adjacent characters, or replace one by a neighbouring key on a QWERTY keyboard (each a quarter of the time).
Words of one character and PTB's ``<unk>`` are left alone.

    python -m difflm.data.typos --corpus ptb --out data/typos-ptb     # train/valid/test.jsonl
    python -m difflm.data.typos --corpus ptb --copies 4 --out data/typos-ptb4   # 4 noisy versions per train line
    python -m difflm.data.typos --corpus ptb --train-real 0.2 --train-char 0.1 --out data/typos-ptb-dense
        # denser typos in the training pairs only (valid and test keep --real / --char: the task's rates)
    python -m difflm.data.typos --corpus text --path ../shared/data/tinyshakespeare.txt --out data/typos-shakespeare
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

from ..errors import DiffLMError

INSTALL = "pip install codespell"
DEBIAN = Path("/usr/lib/python3/dist-packages/codespell_lib/data/dictionary.txt")
ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
SETTINGS = "typos.json"  # the arguments a data folder was written with
REAL, CHAR = 0.1, 0.05  # the task's rates: share of known words misspelt, share of words with a keyboard typo


def _neighbours() -> dict[str, str]:
    pos = {c: (r, i) for r, row in enumerate(ROWS) for i, c in enumerate(row)}
    out = {}
    for c, (r, i) in pos.items():
        out[c] = "".join(d for d, (r2, i2) in pos.items() if d != c and abs(r2 - r) <= 1 and abs(i2 - i) <= 1)
    return out


NEAR = _neighbours()


def dictionary_path() -> Path:
    spec = importlib.util.find_spec("codespell_lib")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "data" / "dictionary.txt"
        if p.is_file():
            return p
    if DEBIAN.is_file():
        return DEBIAN
    raise DiffLMError(f"the misspelling dictionary comes from codespell; run: {INSTALL} (or apt-get install codespell)")


@lru_cache(maxsize=1)
def misspellings() -> dict[str, tuple[str, ...]]:
    """correct word -> its misspellings (lower case), from codespell's unambiguous entries."""
    out: dict[str, list[str]] = {}
    for line in dictionary_path().read_text(encoding="utf-8").splitlines():
        wrong, _, right = line.partition("->")
        right = right.strip()
        if not right or "," in right or " " in right or not wrong.isalpha() or not right.isalpha():
            continue
        out.setdefault(right.lower(), []).append(wrong.lower())
    return {k: tuple(sorted(set(v))) for k, v in out.items()}


def char_typo(word: str, rng: random.Random) -> str:
    """One keyboard typo: insert, delete, swap or replace (near keys)."""
    i = rng.randrange(len(word))
    c = word[i].lower()
    kind = rng.randrange(4)
    near = NEAR.get(c, "")
    if kind == 0 and near:
        return word[: i + 1] + rng.choice(near) + word[i + 1 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    if kind == 2 and len(word) > 1:
        j = min(i, len(word) - 2)
        return word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    if near:
        return word[:i] + rng.choice(near) + word[i + 1 :]
    return word[:i] + word[i + 1 :]


def add_typos(sentence: str, rng: random.Random, real: float = REAL, char: float = CHAR) -> tuple[str, int]:
    """The sentence with typos; returns (noisy, number of words changed)."""
    table = misspellings()
    words, changed = sentence.split(" "), 0
    for k, w in enumerate(words):
        if len(w) < 2 or w == "<unk>":
            continue
        u = rng.random()
        if u < real and w.lower() in table:
            new = rng.choice(table[w.lower()])
        elif u < real + char:
            new = char_typo(w, rng)
        else:
            continue
        if new != w:
            words[k], changed = new, changed + 1
    return " ".join(words), changed


def make_pairs(lines: list[str], seed: int, real: float = REAL, char: float = CHAR, copies: int = 1) -> list[dict]:
    """{"source": noisy, "target": clean} for each non-empty line, seeded per line index (a line's noise does not
    depend on the others); ``copies`` > 1 writes that many noisy versions of every line, copy by copy (copy 0 is
    the one-copy output; copy c draws from its own seed), so that training meets fresh typos in each epoch."""
    out = []
    for c in range(copies):
        for i, line in enumerate(lines):
            line = " ".join(line.split())
            if not line:
                continue
            rng = random.Random(seed * 1_000_003 + i + c * 7_919_000_011)
            noisy, _ = add_typos(line, rng, real, char)
            out.append({"source": noisy, "target": line})
    return out


def main(argv: list[str] | None = None) -> int:
    from .corpora import ptb_lines

    ap = argparse.ArgumentParser(description="write noisy → clean pairs for typo correction")
    ap.add_argument("--corpus", choices=("ptb", "text"), default="ptb")
    ap.add_argument("--path", default=None, help="corpus text: a text file (lines; 10%% valid, 10%% test at the end)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", type=float, default=REAL, help="share of words given a real misspelling when known")
    ap.add_argument("--char", type=float, default=CHAR, help="share of words given a keyboard typo")
    ap.add_argument("--copies", type=int, default=1, help="noisy versions of each training line (valid and test "
                    "keep one)")
    ap.add_argument("--train-real", type=float, default=None, help="--real for the training pairs only (default: "
                    "--real); valid and test keep the task's rate")
    ap.add_argument("--train-char", type=float, default=None, help="--char for the training pairs only (default: "
                    "--char)")
    a = ap.parse_args(argv)
    if a.copies < 1:
        raise DiffLMError("--copies must be at least 1")
    for flag, v in (("--real", a.real), ("--char", a.char), ("--train-real", a.train_real),
                    ("--train-char", a.train_char)):
        if v is not None and not 0 <= v <= 1:
            raise DiffLMError(f"{flag} is a share of words: give a number from 0 to 1, not {v:g}")
    train_real = a.real if a.train_real is None else a.train_real
    train_char = a.char if a.train_char is None else a.train_char
    if a.corpus == "ptb":
        splits = {s: ptb_lines(s) for s in ("train", "valid", "test")}
    else:
        if not a.path:
            raise DiffLMError("--corpus text needs --path (a text file, one sentence a line)")
        lines = [x for x in Path(a.path).read_text(encoding="utf-8").splitlines() if x.strip()]
        n = len(lines)
        splits = {"train": lines[: int(0.8 * n)], "valid": lines[int(0.8 * n) : int(0.9 * n)],
                  "test": lines[int(0.9 * n) :]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, (name, lines) in enumerate(splits.items()):
        train = name == "train"
        rows = make_pairs(lines, a.seed * 3 + k, train_real if train else a.real, train_char if train else a.char,
                          a.copies if train else 1)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} pairs -> {out / f'{name}.jsonl'}")
    # how the pairs were made, so that a later reader of the folder can check it holds the data it expects
    settings = {"corpus": a.corpus, "path": a.path, "seed": a.seed, "real": a.real, "char": a.char, "copies": a.copies,
                "train_real": train_real, "train_char": train_char}
    (out / SETTINGS).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    return 0


def _cli(argv: list[str] | None = None) -> int:
    """``main`` with the command line's error rule: a user's mistake is one line on stderr and exit code 2."""
    import sys

    try:
        return main(argv)
    except DiffLMError as e:
        print(f"difflm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(_cli())
