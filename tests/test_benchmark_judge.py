"""The three readings of the word-level AR judge in benchmarks/adaptation.py (and infill.py): a word the judge lacks
stays its [UNK], becomes <unk> (PTB's convention), or becomes <unk> only where it is a real English word."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from adaptation import judge_reading, read_dictionary, real_word  # noqa: E402

VOCAB = {"the": 0, "third": 1, "quarter": 2, "said": 3, "<unk>": 4, "n't": 5}
DICTIONARY = frozenset({"symposium", "vladimir", "dissatisfied"})
NON_WORDS = ["dieteb", "thebay", "-", ".", "a--b", "quarter-dieteb"]
WORDS = sorted(VOCAB) + sorted(DICTIONARY) + NON_WORDS + ["Said", "Vladimir"]  # capitalised: real, lacked by the judge


def known(w: str) -> int | None:
    return VOCAB.get(w)


def test_real_word_reads_compounds_by_their_parts():
    assert real_word("symposium", known, DICTIONARY)
    assert real_word("Symposium", known, DICTIONARY) and real_word("Third-Quarter", known, DICTIONARY)
    assert real_word("third-quarter", known, DICTIONARY)  # both parts in the judge's vocabulary
    assert real_word("vladimir-symposium", known, DICTIONARY)  # both in the word list
    for w in NON_WORDS:
        assert not real_word(w, known, DICTIONARY), w


def test_the_three_readings_of_one_line():
    text = "the symposium said dieteb\nthird-quarter - The"
    assert judge_reading(text, known, "<unk>") == "the <unk> said <unk>\n<unk> <unk> <unk>"
    assert judge_reading(text, known, "<unk>", DICTIONARY) == "the <unk> said dieteb\n<unk> - <unk>"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WORDS), max_size=8), min_size=1, max_size=4))
def test_only_words_the_judge_lacks_change(lines):
    text = "\n".join(" ".join(line) for line in lines)
    lenient = judge_reading(text, known, "<unk>")
    strict_real = judge_reading(text, known, "<unk>", DICTIONARY)
    for out in (lenient, strict_real):
        got = [line.split() for line in out.split("\n")]
        assert got == [[w if known(w) is not None else got[i][j] for j, w in enumerate(line)]
                       for i, line in enumerate(lines)]  # known words kept, in place; lines and lengths kept
    for line, a, b in zip(lines, lenient.split("\n"), strict_real.split("\n")):
        for w, x, y in zip(line, a.split(), b.split()):
            if known(w) is None:
                assert x == "<unk>"  # PTB's convention: every word the judge lacks
                assert y == ("<unk>" if real_word(w, known, DICTIONARY) else w)  # a non-word stays the judge's [UNK]


def test_read_dictionary(tmp_path):
    assert read_dictionary(None) is None
    assert read_dictionary(tmp_path / "missing") is None
    (tmp_path / "words").write_text("Vladimir\nsymposium\n")
    assert read_dictionary(tmp_path / "words") == frozenset({"vladimir", "symposium"})
