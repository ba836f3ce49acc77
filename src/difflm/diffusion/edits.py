"""Edit scripts between token sequences: the Levenshtein alignment that edit-based diffusion (DiffusER, Reid et al.
2022; Edit Flows, Havasi et al. 2025) trains on. Any pair (a, b) is a training pair: the script that turns a into b
is computed, never stored from a forward pass.

A script over a source a of length n holds, per source token, an operation — KEEP, DELETE or REPLACE — and, per
gap (before token 0, between tokens, after the last: n + 1 of them), how many tokens are inserted there; plus the
new tokens (replacements and insertions) in output order. Its cost (DELETEs + REPLACEs + inserted tokens) is the
Levenshtein distance (unit costs), so the script is a shortest edit path.

    a = [x, y, z],  ops = [KEEP, REPLACE, DELETE],  ins = [1, 0, 0, 1],  new = [u, v, w]  ->  b = [u, x, v, w]
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

KEEP, DELETE, REPLACE = 0, 1, 2
OPS = ("KEEP", "DELETE", "REPLACE")
# the edit families' ``process.align`` (both read ``Process.aligned_by``)
ALIGN_HELP = ("which shortest Levenshtein script training aligns by: words (fewest replacements that turn a word-start "
              "token into a word-inner one or back, so the model learns edits that never join or split words) or "
              "tokens (the first found; runs saved before 2026-12-05)")
# the edit family's third choice (``word_script``)
WHOLE_WORDS_HELP = ("; or whole-words (the shortest script over whole words, a changed word rewritten whole: its first "
                    "token replaced and the rest deleted, its new tokens written there, GECToR's word-level tags)")


@dataclass
class EditScript:
    """ops: (n,) KEEP/DELETE/REPLACE per source token; ins: (n + 1,) tokens inserted in each gap (gap i is before
    source token i, gap n after the last); new: the replacement and inserted tokens in output order."""

    ops: list[int]
    ins: list[int]
    new: list[int]

    @property
    def cost(self) -> int:
        return sum(o != KEEP for o in self.ops) + sum(self.ins)


def levenshtein(a: list[int], b: list[int]) -> int:
    """The unit-cost edit distance (insert, delete, substitute), by the plain dynamic programme."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def edit_script(a: list[int], b: list[int], starts: Collection[int] = ()) -> EditScript:
    """A shortest script turning ``a`` into ``b``. With ``starts`` (the token ids that begin a word), among the
    shortest scripts the one with the fewest REPLACEs that turn a word-start token into a word-inner one or back:
    ``Ġb g -> Ġbig`` replaces ``Ġb`` and deletes ``g`` rather than deleting ``Ġb`` and writing ``Ġbig`` over ``g``,
    so no part of the script joins or splits words. Ties left are broken the same way every time (keep/replace
    before delete before insert, scanning from the end), so a pair always gets the same script."""
    n, m = len(a), len(b)
    # costs as one integer, unit edits weighing W and a word-class-crossing replacement 1 more: min over these is
    # the lexicographic (edits, crossings) order, since a script has fewer than W crossings
    W = n + m + 1 if starts else 1
    cross_a, cross_b = [x in starts for x in a], [y in starts for y in b]
    D = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        D[i][0] = i * W
    for j in range(m + 1):
        D[0][j] = j * W

    def sub(i: int, j: int) -> int:
        return 0 if a[i] == b[j] else W + (cross_a[i] != cross_b[j])

    for i in range(1, n + 1):
        x, cx, row, up = a[i - 1], cross_a[i - 1], D[i], D[i - 1]
        for j in range(1, m + 1):
            d = up[j - 1] if x == b[j - 1] else up[j - 1] + W + (cx != cross_b[j - 1])
            row[j] = min(up[j] + W, row[j - 1] + W, d)
    ops = [KEEP] * n
    ins = [0] * (n + 1)
    out: list[int | None] = [None] * m  # which output positions are new (their token), None: a kept token
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and D[i][j] == D[i - 1][j - 1] + sub(i - 1, j - 1):
            if a[i - 1] != b[j - 1]:
                ops[i - 1] = REPLACE
                out[j - 1] = b[j - 1]
            i, j = i - 1, j - 1
        elif i > 0 and D[i][j] == D[i - 1][j] + W:
            ops[i - 1] = DELETE
            i -= 1
        else:  # an insertion into gap i (before source token i)
            ins[i] += 1
            out[j - 1] = b[j - 1]
            j -= 1
    return EditScript(ops, ins, [t for t in out if t is not None])


def apply_script(a: list[int], s: EditScript) -> list[int]:
    """The sequence the script makes of ``a``: in each gap its inserted tokens, then the source token kept,
    replaced or dropped."""
    if len(s.ops) != len(a) or len(s.ins) != len(a) + 1:
        raise ValueError("the script does not fit the sequence")
    new = iter(s.new)
    out = []
    for i in range(len(a) + 1):
        out.extend(next(new) for _ in range(s.ins[i]))
        if i < len(a):
            if s.ops[i] == KEEP:
                out.append(a[i])
            elif s.ops[i] == REPLACE:
                out.append(next(new))
    return out


def with_placeholders(a: list[int], ops: list[int], ins: list[int], placeholder: int) -> tuple[list[int], list[bool]]:
    """The generator's input: ``a`` with the tagged edits made and every new token a ``placeholder`` (the
    replaced positions and the inserted slots); returns it and, per position, whether it is a placeholder."""
    out, slot = [], []
    for i in range(len(a) + 1):
        out.extend([placeholder] * ins[i])
        slot.extend([True] * ins[i])
        if i < len(a) and ops[i] != DELETE:
            out.append(placeholder if ops[i] == REPLACE else a[i])
            slot.append(ops[i] == REPLACE)
    return out, slot


def atomic_edits(s: EditScript) -> list[tuple]:
    """The script as single edits, in output order: ("delete", i), ("replace", i, token), ("insert", gap, token)."""
    out, new = [], iter(s.new)
    for i in range(len(s.ops) + 1):
        out.extend(("insert", i, next(new)) for _ in range(s.ins[i]))
        if i < len(s.ops):
            if s.ops[i] == DELETE:
                out.append(("delete", i))
            elif s.ops[i] == REPLACE:
                out.append(("replace", i, next(new)))
    return out


def partial_script(n: int, edits: list[tuple], applied: list[bool]) -> EditScript:
    """The script over a source of n tokens that makes only the ``applied`` ones of ``edits`` (atomic_edits's
    order): a point on the edit path from the source to the target."""
    ops, ins, new = [KEEP] * n, [0] * (n + 1), []
    for e, on in zip(edits, applied):
        if not on:
            continue
        if e[0] == "insert":
            ins[e[1]] += 1
            new.append(e[2])
        elif e[0] == "delete":
            ops[e[1]] = DELETE
        else:
            ops[e[1]] = REPLACE
            new.append(e[2])
    return EditScript(ops, ins, new)


def word_spans(a: list[int], starts: Collection[int]) -> list[tuple[int, int]]:
    """(start, end) of each word of ``a``: a word begins at a token in ``starts`` (and at the first token); with no
    ``starts`` every token is a word."""
    spans: list[list[int]] = []
    for i, x in enumerate(a):
        if not spans or not starts or x in starts:
            spans.append([i, i + 1])
        else:
            spans[-1][1] = i + 1
    return [(s, e) for s, e in spans]


def word_script(a: list[int], b: list[int], starts: Collection[int]) -> EditScript:
    """A script turning ``a`` into ``b`` with whole words as its units (``process.align: whole-words``): the
    shortest script over the words (``word_spans``; ``edit_script``'s tie rule), each changed word rewritten whole.
    A replaced word's first token is REPLACEd by the new word's last token, its other tokens are DELETEd, and the
    new word's other tokens are inserted in the gap before it, so the tagger decides a word at its first token (op
    and insert count) and the DELETEs of the rest; a deleted word is deleted, an inserted word inserted. Tagging each
    word at its first subword is GECToR's (Omelianchuk et al. 2020, §3): a misspelt word split into odd pieces gets
    one pattern, where a token alignment keeps whichever pieces the two spellings share and edits the rest. The
    script rebuilds ``b``; its cost counts tokens, so it is not the token Levenshtein distance, but it changes
    exactly the word Levenshtein distance's number of words. A REPLACE may write the token it replaces (``Ġthe e``
    -> ``Ġthe``: the word's last token is its old first one)."""
    sa, sb = word_spans(a, starts), word_spans(b, starts)
    ids: dict[tuple[int, ...], int] = {}
    wa = [ids.setdefault(tuple(a[s:e]), len(ids)) for s, e in sa]
    wb = [ids.setdefault(tuple(b[s:e]), len(ids)) for s, e in sb]
    words = {i: list(w) for w, i in ids.items()}
    ws = edit_script(wa, wb)
    n = len(a)
    ops, gaps, last = [KEEP] * n, [[] for _ in range(n + 1)], {}
    new = iter(ws.new)
    for w in range(len(wa) + 1):
        g = sa[w][0] if w < len(wa) else n
        for _ in range(ws.ins[w]):
            gaps[g].extend(words[next(new)])
        if w == len(wa) or ws.ops[w] == KEEP:
            continue
        s, e = sa[w]
        ops[s:e] = [DELETE] * (e - s)
        if ws.ops[w] == REPLACE:
            *head, last[s] = words[next(new)]
            gaps[s].extend(head)
            ops[s] = REPLACE
    out: list[int] = []
    for i in range(n + 1):
        out.extend(gaps[i])
        if i < n and ops[i] == REPLACE:
            out.append(last[i])
    return EditScript(ops, [len(g) for g in gaps], out)
