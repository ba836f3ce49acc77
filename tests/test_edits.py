"""Edit scripts: for any pair the script rebuilds the target, its cost is the Levenshtein distance of a plain
dynamic programme, and the generator's placeholder sequence filled with the new tokens in order is the target."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from difflm.diffusion.edits import (
    DELETE,
    KEEP,
    REPLACE,
    EditScript,
    apply_script,
    edit_script,
    levenshtein,
    with_placeholders,
    word_script,
    word_spans,
)

seqs = st.lists(st.integers(0, 5), max_size=14)


def naive_distance(a, b):
    """Recursive definition with memo (independent of the iterative DP)."""

    @functools.cache
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


@settings(max_examples=300, deadline=None)
@given(seqs, seqs)
def test_script_rebuilds_the_target_at_the_levenshtein_cost(a, b):
    s = edit_script(a, b)
    assert apply_script(a, s) == b
    assert s.cost == levenshtein(a, b) == naive_distance(tuple(a), tuple(b))
    assert len(s.new) == sum(o == REPLACE for o in s.ops) + sum(s.ins)
    it = iter(s.new)
    for i in range(len(a) + 1):
        for _ in range(s.ins[i]):
            next(it)
        if i < len(a) and s.ops[i] == REPLACE:
            assert next(it) != a[i]  # a replacement changes the token (else it would be a KEEP)
    filled, slots = with_placeholders(a, s.ops, s.ins, -1)
    it = iter(s.new)
    assert [next(it) if is_slot else t for t, is_slot in zip(filled, slots)] == b
    assert edit_script(a, b) == s  # deterministic


def shortest_scripts(a, b):
    """Every shortest alignment of a and b as its list of (a token, b token) replacements, by recursion (no DP
    table, no tie rule)."""
    best = naive_distance(tuple(a), tuple(b))

    @functools.cache
    def walk(i, j, left):  # alignments of a[:i], b[:j] with ``left`` edits
        if i == 0 and j == 0:
            return [()] if left == 0 else []
        out = []
        if i and j:
            same = a[i - 1] == b[j - 1]
            out += [r + (() if same else ((a[i - 1], b[j - 1]),)) for r in walk(i - 1, j - 1, left - (not same))]
        if i and left:
            out += walk(i - 1, j, left - 1)
        if j and left:
            out += walk(i, j - 1, left - 1)
        return out

    return walk(len(a), len(b), best)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=7), st.lists(st.integers(0, 5), max_size=7))
def test_a_word_aware_script_is_shortest_and_crosses_word_starts_least(a, b):
    starts = {0, 1, 2}  # the ids that begin a word
    s = edit_script(a, b, starts)
    assert apply_script(a, s) == b and s.cost == levenshtein(a, b)
    new = iter(s.new)
    crossed = 0
    for i in range(len(a) + 1):
        for _ in range(s.ins[i]):
            next(new)
        if i < len(a) and s.ops[i] == REPLACE:
            crossed += (a[i] in starts) != (next(new) in starts)
    least = min(sum((x in starts) != (y in starts) for x, y in r) for r in shortest_scripts(a, b))
    assert crossed == least
    assert edit_script(a, b, set()) == edit_script(a, b)  # no word starts known: the token alignment


def test_a_misspelt_word_is_replaced_from_its_start_not_merged_into_its_neighbour():
    weekend, b_, g, big, fund = "Ġweekend", "Ġb", "g", "Ġbig", "Ġfund"
    ids = {t: i for i, t in enumerate((weekend, b_, g, big, fund))}
    a, b = [ids[t] for t in (weekend, b_, g, fund)], [ids[t] for t in (weekend, big, fund)]
    starts = {ids[t] for t in (weekend, b_, big, fund)}
    # by tokens alone the first shortest script deletes "Ġb" and writes "Ġbig" over "g": made halfway (the
    # delete alone), it joins "g" onto "weekend"
    assert edit_script(a, b).ops == [KEEP, DELETE, REPLACE, KEEP]
    assert edit_script(a, b, starts).ops == [KEEP, REPLACE, DELETE, KEEP]


def test_a_worked_example():
    x, y, z, u, v, w = range(6)
    s = EditScript([KEEP, REPLACE, DELETE], [1, 0, 0, 1], [u, v, w])
    assert apply_script([x, y, z], s) == [u, x, v, w]
    assert edit_script([x, y, z], [x, y, z]).cost == 0
    assert edit_script([], [x, y]).ins == [2] and edit_script([x, y], []).ops == [DELETE, DELETE]


@settings(max_examples=200, deadline=None)
@given(seqs, seqs, st.integers(1, 6), st.integers(0, 10**6))
def test_the_edit_path_runs_from_source_to_target(src, tgt, T, seed):
    import random

    from difflm.diffusion.edit import EditDiffusion
    from difflm.diffusion.edits import atomic_edits, partial_script

    s = edit_script(src, tgt)
    edits = atomic_edits(s)
    assert apply_script(src, partial_script(len(src), edits, [True] * len(edits))) == tgt
    assert apply_script(src, partial_script(len(src), edits, [False] * len(edits))) == src
    p = EditDiffusion(vocab_size=10, mask_id=7, pad_id=6, bos_id=8, eos_id=9, steps=T)
    rng = random.Random(seed)
    for t in range(1, T + 1):
        prev, cur = p.path_pair(src, tgt, t, rng)
        if t == T:
            assert cur == src
        if t == 1:
            assert prev == tgt
        # one step makes its share of the edits: the states are that far apart at most
        assert levenshtein(cur, prev) <= len(edits) * 1 // T + len(edits) % T + 1


@settings(max_examples=300, deadline=None)
@given(seqs, seqs)
def test_a_whole_word_script_rewrites_each_changed_word_whole(a, b):
    """``align: whole-words``: the script rebuilds the target, changes exactly the word Levenshtein distance's number
    of words, and tags every changed word one way: its first token REPLACE (or DELETE, a deleted word), its other
    tokens DELETE; tokens are inserted only before a word or at the end."""
    starts = {0, 1, 2}
    s = word_script(a, b, starts)
    assert apply_script(a, s) == b
    spans = word_spans(a, starts)
    words = lambda x: [tuple(x[i:j]) for i, j in word_spans(x, starts)]  # noqa: E731
    changed = [(i, j) for i, j in spans if any(o != KEEP for o in s.ops[i:j])]
    inserted_words = len(words(b)) - (len(spans) - sum(s.ops[i] == DELETE for i, _ in changed))
    assert len(changed) + inserted_words == naive_distance(tuple(words(a)), tuple(words(b)))
    for i, j in changed:
        assert s.ops[i] in (REPLACE, DELETE) and all(o == DELETE for o in s.ops[i + 1 : j])
    assert all(s.ins[g] == 0 for g in range(len(a)) if g not in {i for i, _ in spans})
    assert word_script(a, b, ()) == edit_script(a, b)  # no word starts: every token a word, the token script


def test_a_misspelt_word_is_rewritten_from_its_first_token():
    """Ġsto pp p ed -> Ġsto pped: the token script keeps Ġsto and writes "pped" over the last piece; the whole-word
    script replaces Ġsto (by the word's last token, its first inserted before it) and deletes the rest, and a
    REPLACE may write the token it replaces (Ġthe e -> Ġthe)."""
    the, e, sto, pp, p, ed, pped, dog = range(8)
    starts = {the, sto, dog}
    a, b = [the, sto, pp, p, ed, dog], [the, sto, pped, dog]
    assert edit_script(a, b, starts).ops == [KEEP, KEEP, DELETE, DELETE, REPLACE, KEEP]
    s = word_script(a, b, starts)
    assert (s.ops, s.ins, s.new) == ([KEEP, REPLACE, DELETE, DELETE, DELETE, KEEP], [0, 1, 0, 0, 0, 0, 0], [sto, pped])
    s = word_script([the, e, dog], [the, dog], starts)
    assert (s.ops, s.new) == ([REPLACE, DELETE, KEEP], [the])
