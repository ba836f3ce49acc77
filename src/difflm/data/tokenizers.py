"""Tokenizers: character, word (PTB style), byte-level BPE trained locally, or any Hugging Face tokenizer.

Every one is a Hugging Face ``tokenizers.Tokenizer`` saved as ``tokenizer.json``, with the special tokens
[PAD], [MASK], [BOS], [EOS] (and [UNK] for the closed vocabularies). A line break in the data is [EOS].
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import DiffLMError

SPECIALS = {"pad": "[PAD]", "mask": "[MASK]", "bos": "[BOS]", "eos": "[EOS]", "unk": "[UNK]"}
KINDS = ("char", "word", "bpe", "hf")


#: characters encoded per call: long lines are cut (at a space, for word and subword tokenizers) into pieces
#: of at most this size, so tokenizing (and training a tokenizer on) a corpus holds one piece at a time
CHUNK_CHARS = 1 << 16


def pieces(line: str, anywhere: bool = False) -> Iterator[str]:
    """A line in pieces of at most CHUNK_CHARS characters, each piece after the first starting at a space
    (a word's leading space stays with it, so whitespace and byte-level pre-tokenizers split it as before)."""
    start = 0
    while len(line) - start > CHUNK_CHARS:
        end = start + CHUNK_CHARS
        if not anywhere:
            cut = line.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        yield line[start:end]
        start = end
    yield line[start:]


class Tokenizer:
    """A Hugging Face tokenizer plus the ids of difflm's special tokens."""

    def __init__(self, hf: HFTokenizer, kind: str, *, eos_token: str | None = None,
                 mask_token: str | None = None, unk_text: str | None = None) -> None:
        """difflm's special tokens that ``hf`` lacks are added after its vocabulary, except [EOS] / [MASK] when
        ``eos_token`` / ``mask_token`` name existing tokens to serve as them (a pretrained model's own: GPT-2's
        <|endoftext|>, BERT's [SEP], LLaDA's <|mdm_mask|>), by the token or by a text that is one token ("\n").
        ``unk_text``: a corpus's spelling of an unknown word (PTB's ``<unk>``), encoded as the tokenizer's own
        unknown token and decoded back to that spelling (``tokenizer.unk_text``)."""
        hf.no_padding()  # a tokenizer.json may carry a fixed padding/truncation (sentence encoders: 128); difflm
        hf.no_truncation()  # lays out rows itself
        self.hf, self.kind = hf, kind
        self._unreachable: frozenset[int] | None = None  # unreachable_ids(), found on first use
        aliases = {k: v for k, v in (("eos", eos_token), ("mask", mask_token)) if v}
        for k, tok in aliases.items():
            if hf.token_to_id(tok) is None:  # a text that is one token, e.g. "\n" (byte-level BPE's "Ċ")
                ids = hf.encode(tok, add_special_tokens=False).ids
                if len(ids) != 1 or hf.decode(ids, skip_special_tokens=False) != tok:  # not an unknown word's [UNK]
                    raise DiffLMError(f"the tokenizer has no token {tok!r} to use as {SPECIALS[k]}")
                aliases[k] = hf.id_to_token(ids[0])
        names = dict(SPECIALS, **aliases)
        missing = [t for k, t in names.items() if k != "unk" and hf.token_to_id(t) is None]
        if missing:
            hf.add_special_tokens(missing)
        self.special = {k: hf.token_to_id(t) for k, t in names.items() if hf.token_to_id(t) is not None}
        self.pad_id, self.mask_id = self.special["pad"], self.special["mask"]
        self.bos_id, self.eos_id = self.special["bos"], self.special["eos"]
        self.unk_text, self._unk_token = unk_text, None
        if unk_text is not None:
            unk = self._model_json().get("unk_token")
            uid = hf.token_to_id(unk) if unk else None
            # the unknown token must be one a text can name (an added token, matched before normalisation)
            if uid is None or hf.encode(unk, add_special_tokens=False).ids != [uid]:
                raise DiffLMError(f"tokenizer.unk_text {unk_text!r}: this tokenizer has no unknown token to read it "
                                  "as (a byte-level BPE spells every text); remove tokenizer.unk_text")
            self._unk_token = unk

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def word_starts(self) -> frozenset[int]:
        """The ids of tokens that begin a word: a byte-level BPE token after a space (``Ġ``), a SentencePiece one
        (``▁``), a character tokenizer's space, every WordPiece token but a ``##`` continuation, every token of a
        word vocabulary; special tokens are none of them. The edit family's alignment keeps them apart
        (``process.align: words``)."""
        model = self._model_json()
        cont = self._continuation_prefix(model)
        special = set(self.special.values())
        out = set()
        for tok, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i in special:
                continue
            if self.kind == "word" or (model.get("type") == "WordPiece" and not tok.startswith(cont)):
                out.add(i)
            elif tok[:1] in ("Ġ", "▁") or tok[:1].isspace():
                out.add(i)
        return frozenset(out)

    def _model_json(self) -> dict:
        """The tokenizer.json's ``model`` section (its type, vocabulary, word-piece prefix)."""
        return json.loads(self.hf.to_str()).get("model", {})

    @staticmethod
    def _continuation_prefix(model: dict) -> str:
        """The prefix of a word-piece continuation (WordPiece's ``##``)."""
        return model.get("continuing_subword_prefix") or "##"

    def unreachable_ids(self) -> frozenset[int]:
        """The ids no text encodes to, found by round trip: a token that is not a word-piece continuation (``##``)
        and whose own text does not encode back to it alone (BERT's ``[unused7]`` → ``[``, ``unused``, ``##7``,
        ``]``; its ``...`` → three dots; an accented piece an uncased normaliser strips), plus the pretrained
        model's own special tokens that difflm does not use ([CLS], <|im_start|>: only a text that spells one out
        literally encodes to it, which the trainer refuses under ``exclude_unreachable``). Continuations are kept (they
        occur only inside a word, so their text alone proves nothing), as are byte-level pieces of a multi-byte
        character (they decode alone to U+FFFD), and difflm's special ids are never in the set. Empty for
        difflm's own tokenizers (char, word, bpe: built from the text, every row reachable)."""
        if self.kind != "hf":
            return frozenset()
        if self._unreachable is None:  # a pass over the vocabulary: once per tokenizer
            self._unreachable = self._find_unreachable()
        return self._unreachable

    def _find_unreachable(self) -> frozenset[int]:
        cont = self._continuation_prefix(self._model_json())
        ours = set(self.special.values())
        added = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        ids = [i for i in range(self.vocab_size)
               if i not in ours | added and not self.hf.id_to_token(i).startswith(cont)]
        texts = [self.hf.decode([i], skip_special_tokens=False) for i in ids]
        back = self.hf.encode_batch(texts, add_special_tokens=False)
        # a byte-level piece of a multi-byte character decodes alone to U+FFFD: proven nothing, kept
        return frozenset(i for i, t, b in zip(ids, texts, back) if b.ids != [i] and "\ufffd" not in t) | (added - ours)

    def _spelled(self, text: str) -> str:
        """The text with ``unk_text`` written as the unknown token (which the tokenizer reads as one id)."""
        return text.replace(self.unk_text, self._unk_token) if self._unk_token else text

    def encode(self, text: str) -> list[int]:
        """Text of one line (no line breaks) -> ids, no special tokens added."""
        return self.hf.encode(self._spelled(text), add_special_tokens=False).ids

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch([self._spelled(t) for t in lines], add_special_tokens=False)]

    def decode(self, ids: Iterable[int], mask_as: str = "_") -> str:
        """ids -> text: [EOS] becomes a line break, [MASK] becomes ``mask_as``, [PAD]/[BOS] vanish."""
        out, run = [], []
        skip = {self.pad_id, self.bos_id}

        def flush():
            if run:
                out.append(self.hf.decode(run, skip_special_tokens=False))
                run.clear()

        for i in ids:
            i = int(i)
            if i in skip:
                continue
            if i == self.eos_id or i == self.mask_id:
                flush()
                out.append("\n" if i == self.eos_id else (f" {mask_as} " if self.kind == "word" else mask_as))
            else:
                run.append(i)
        flush()
        text = "".join(out)
        if self._unk_token:
            text = text.replace(self._unk_token, self.unk_text)
        if self.kind == "word":  # word pieces were joined with spaces inside runs; tidy the seams
            text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
        return text

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (a kill leaves the old file or the new one)."""
        from ..io import atomic_write_text

        atomic_write_text(Path(path), self.hf.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | Path, kind: str, special: dict[str, int] | None = None,
             eos_token: str | None = None, unk_text: str | None = None) -> Tokenizer:
        """A saved tokenizer.json; ``special``: the ids config.json recorded (None: difflm's own tokens);
        ``eos_token``: the configured token that serves as [EOS] (``tokenizer.eos_token``), when no ids are recorded
        yet (a training run's own tokenizer); ``unk_text``: the run's ``tokenizer.unk_text``."""
        path = Path(path)
        if not path.is_file():
            raise DiffLMError(f"tokenizer file {path} not found; the model folder is incomplete")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # a corrupted or foreign file
            raise DiffLMError(f"cannot read tokenizer {path}: {e}") from None
        # a recorded [EOS] or [MASK] that is the model's own token (a converted checkpoint's) is found by name
        own = {}
        for k in ("eos", "mask"):
            tok = hf.id_to_token(special[k]) if special and isinstance(special.get(k), int) else None
            own[f"{k}_token"] = tok if tok not in (None, SPECIALS[k]) else None
        if eos_token and not own["eos_token"]:
            own["eos_token"] = eos_token
        try:
            return cls(hf, kind, **own, unk_text=unk_text)
        except Exception as e:
            raise DiffLMError(f"cannot read tokenizer {path}: {e}") from None


def _specials_first() -> dict[str, int]:
    return {t: i for i, t in enumerate(SPECIALS.values())}


def train_char(lines: list[str]) -> Tokenizer:
    """One token per character seen in training text; unseen characters map to [UNK]."""
    vocab = _specials_first()
    seen: set[str] = set()
    for line in lines:
        seen.update(line)
    for ch in sorted(seen):
        vocab.setdefault(ch, len(vocab))
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk"]))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(list(SPECIALS.values()))
    return Tokenizer(hf, "char")


def train_word(lines: list[str], min_count: int = 1) -> Tokenizer:
    """Whitespace-separated words (PTB convention); words rarer than min_count map to [UNK]."""
    counts: Counter[str] = Counter()
    for line in lines:
        for piece in pieces(line):
            counts.update(piece.split())
    vocab = _specials_first()
    for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if c >= min_count:
            vocab.setdefault(w, len(vocab))
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk"]))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(list(SPECIALS.values()))
    return Tokenizer(hf, "word")


def train_bpe(lines: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on the training text with Hugging Face ``tokenizers``."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = [t for k, t in SPECIALS.items() if k != "unk"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator((p for line in lines for p in pieces(line)), trainer=trainer)
    return Tokenizer(hf, "bpe")


def load_hf(path: str, eos_token: str | None = None, unk_text: str | None = None,
            add_words: list[str] | None = None, decode_cleanup: bool | None = None) -> Tokenizer:
    """Any Hugging Face tokenizer: a tokenizer.json, a folder holding one, a pretrained model's (a .gguf file or
    ``smollm2-135m``, read through ``transformers``: the tokenizer that goes with ``model.init``), or a hub
    name. ``add_words`` become tokens after its vocabulary (``tokenizer.add_words``), then difflm's special tokens
    that it lacks; ``decode_cleanup`` set (not None) replaces its decoder's ``cleanup``. Both are saved in the
    tokenizer.json a run folder keeps."""
    hf = _read_hf(path)
    if decode_cleanup is not None:
        spec = json.loads(hf.to_str())
        if "cleanup" not in (spec.get("decoder") or {}):
            kind = (spec.get("decoder") or {}).get("type", "no")
            raise DiffLMError(f"tokenizer.decode_cleanup: {path} has a {kind} decoder, which has no clean-up to set; "
                              "remove tokenizer.decode_cleanup")
        spec["decoder"]["cleanup"] = decode_cleanup
        hf = HFTokenizer.from_str(json.dumps(spec))
    for w in add_words or ():
        if hf.encode(w, add_special_tokens=False).tokens == [w]:
            raise DiffLMError(f"tokenizer.add_words: {w!r} is already one token of {path}; remove it from the list")
        # matched in the raw text (before an uncased normaliser lowercases it), only as a whole word
        hf.add_tokens([AddedToken(w, single_word=True, normalized=False)])
    return Tokenizer(hf, "hf", eos_token=eos_token, unk_text=unk_text)


def _read_hf(path: str) -> HFTokenizer:
    from ..hub import ALIASES, MINILM_ALIASES, load_tokenizer, resolve

    p = resolve(path) if path.lower() in MINILM_ALIASES else Path(path)
    if path.lower() in ALIASES or p.suffix == ".gguf":
        return load_tokenizer(path).backend_tokenizer
    try:
        if p.is_file():
            hf = HFTokenizer.from_file(str(p))
        elif (p / "tokenizer.json").is_file():
            hf = HFTokenizer.from_file(str(p / "tokenizer.json"))
        elif p.exists():
            raise DiffLMError(f"{p} holds no tokenizer.json; point tokenizer.path at one")
        else:
            hf = HFTokenizer.from_pretrained(path)  # hub name (needs network access)
    except DiffLMError:
        raise
    except Exception as e:
        raise DiffLMError(f"cannot load Hugging Face tokenizer {path!r}: {e}") from None
    return hf


def build_tokenizer(cfg, train_lines: list[str]) -> Tokenizer:
    """cfg: TokenizerConfig. Trains (char/word/bpe) on the training lines or loads (hf)."""
    if cfg.type == "char":
        return train_char(train_lines)
    if cfg.type == "word":
        return train_word(train_lines, cfg.min_count)
    if cfg.type == "bpe":
        return train_bpe(train_lines, cfg.vocab_size)
    if cfg.type == "hf":
        if not cfg.path:
            raise DiffLMError("tokenizer.type hf needs tokenizer.path (a tokenizer.json, folder or hub name)")
        return load_hf(cfg.path, cfg.eos_token, cfg.unk_text, cfg.add_words, cfg.decode_cleanup)
    raise DiffLMError(f"unknown tokenizer.type {cfg.type!r}; choose one of {', '.join(KINDS)}")
