"""Tokenizers and datasets."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from difflm.config import DataConfig, TokenizerConfig
from difflm.data import build_dataset, build_tokenizer, load_lines
from difflm.data.tokenizers import Tokenizer, load_hf, train_bpe, train_char, train_word


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=40))
def test_char_and_bpe_round_trip(text):
    assert train_char([text + "x"]).decode(train_char([text + "x"]).encode(text)) == text
    bpe = _bpe()
    assert bpe.decode(bpe.encode(text)) == text  # byte-level: any text survives


_BPE = []


def _bpe():
    if not _BPE:
        _BPE.append(train_bpe(["the quick brown fox jumps over the lazy dog"] * 50, 300))
    return _BPE[0]


def test_word_tokenizer_and_specials():
    tok = train_word(["the cat sat", "the dog sat", "a rare word"], min_count=2)
    assert tok.special == {"pad": 0, "mask": 1, "bos": 2, "eos": 3, "unk": 4}
    ids = tok.encode("the cat sat")
    assert tok.decode(ids) == "the [UNK] sat"
    assert tok.decode([*ids, tok.eos_id, tok.mask_id, tok.pad_id]) == "the [UNK] sat\n_"


def test_word_starts_of_every_tokenizer_kind():
    lines = ["the weekend big fund is here", "mr phelan said the fund"] * 20
    text = "the weekend bg fund"
    for tok, want in ((train_bpe(lines, 300), [" weekend", " ", " fund"]), (train_char(lines), [" "] * 3),
                      (train_word(lines), ["the", "weekend", "fund"])):  # BPE: " " "b" "g"; words: "bg" is [UNK]
        starts = tok.word_starts()
        assert not starts & set(tok.special.values())
        assert [tok.decode([i]) for i in tok.encode(text) if i in starts] == want
    wordpiece = Tokenizer(HFTokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "b": 2, "##g": 3}, unk_token="[UNK]")),
                          "hf")
    assert {wordpiece.hf.id_to_token(i) for i in wordpiece.word_starts()} == {"the", "b"}


def test_hf_tokenizer_by_path_gets_difflm_specials(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_hf(str(tmp_path))
    assert tok.encode("hello world") == [1, 2]
    assert {"pad", "mask", "bos", "eos"} <= set(tok.special) and tok.vocab_size == 7
    tok.save(tmp_path / "t2.json")
    assert Tokenizer.load(tmp_path / "t2.json", "hf").special == tok.special


def test_packed_and_lines_datasets(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("ab\nabc\n\nabcd\n" * 10)
    for mode in ("packed", "lines"):
        cfg = DataConfig(corpus="text", path=str(f), valid_fraction=0.2, mode=mode, seq_len=6,
                         cache_dir=str(tmp_path / "cache"))
        tok = build_tokenizer(TokenizerConfig(type="char"), load_lines(cfg, "train"))
        ds = build_dataset(cfg, tok, "train")
        assert isinstance(ds.tokens, np.memmap)  # tokenized once, memory-mapped
        b = ds.batch([0, 1])
        if mode == "packed":
            assert b.loss_mask.all() and not b.fixed.any()
            stream = np.asarray(ds.tokens).ravel().tolist()
            assert tok.decode(stream).startswith("ab\nabc\n\nabcd\n")
        else:
            pad = b.tokens == tok.pad_id
            assert (b.fixed == (pad | (b.tokens == tok.eos_id))).all() and (b.loss_mask == ~pad).all()
            assert b.tokens[0].tolist()[:3] == [*tok.encode("ab"), tok.eos_id]
        again = build_dataset(cfg, tok, "train")
        assert again.tokens.filename == ds.tokens.filename  # the cache is reused


def test_ptb_is_the_standard_split():
    cfg = DataConfig()
    sizes = {s: len(load_lines(cfg, s)) for s in ("train", "valid", "test")}
    assert sizes == {"train": 42068, "valid": 3370, "test": 3761}
    tok = build_tokenizer(TokenizerConfig(type="word"), load_lines(cfg, "train"))
    assert tok.vocab_size == 10000 - 1 + 5  # 10k PTB words (incl. <unk>, its eos is our [EOS]) + specials


def test_fraction_split_and_missing_test_split(tmp_path):
    from difflm.errors import DiffLMError

    f = tmp_path / "c.txt"
    f.write_text("x" * 90 + "y" * 10)
    cfg = SimpleNamespace(corpus="text", path=str(f), valid_path=None, test_path=None, valid_fraction=0.1,
                          test_fraction=0.0)
    assert load_lines(cfg, "train") == ["x" * 90] and load_lines(cfg, "valid") == ["y" * 10]
    with pytest.raises(DiffLMError, match="no test split"):
        load_lines(cfg, "test")


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
@pytest.mark.parametrize("mode", ["packed", "lines"])
def test_long_lines_are_tokenized_in_pieces_with_the_same_result(kind, mode, tmp_path, monkeypatch):
    """Streaming tokenization (tokenizers.pieces, datasets.encode_stream) cuts lines longer than CHUNK_CHARS at
    spaces; the tokenizer it trains and the rows it writes are those of tokenizing each line whole."""
    import difflm.data.tokenizers as T

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "quickly", "x"]
    lines = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(60)]
    (tmp_path / "t.txt").write_text("\n".join(lines))
    cfg = DataConfig(corpus="text", path=str(tmp_path / "t.txt"), mode=mode, seq_len=24, valid_fraction=0.2)
    tok_cfg = TokenizerConfig(type=kind, vocab_size=120)
    whole_tok = build_tokenizer(tok_cfg, load_lines(cfg, "train"))
    whole = np.asarray(build_dataset(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "a")}), whole_tok,
                                     "train").tokens)
    monkeypatch.setattr(T, "CHUNK_CHARS", 9)  # most lines now span many pieces (and encode calls)
    cut_tok = build_tokenizer(tok_cfg, load_lines(cfg, "train"))
    assert cut_tok.hf.to_str() == whole_tok.hf.to_str()
    cut = np.asarray(build_dataset(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "b")}), cut_tok,
                                   "train").tokens)
    assert np.array_equal(cut, whole)


def test_an_unwritable_token_cache_falls_back_to_a_private_one(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the fallback folder, fresh for this test
    (tmp_path / "t.txt").write_text("\n".join(["the cat sat on the mat"] * 40))
    (tmp_path / "file").write_text("not a folder")  # a cache_dir that cannot be created (root can write anywhere)
    cfg = DataConfig(corpus="text", path=str(tmp_path / "t.txt"), mode="lines", seq_len=16,
                     cache_dir=str(tmp_path / "file" / "cache"))
    tok = build_tokenizer(TokenizerConfig(type="char"), load_lines(cfg, "train"))
    ds = build_dataset(cfg, tok, "train")
    assert len(ds) > 0 and "cannot write the token cache" in capsys.readouterr().err
    assert np.array_equal(np.asarray(build_dataset(cfg, tok, "train").tokens), np.asarray(ds.tokens))  # found again


def test_eos_token_given_as_a_text_that_is_one_token(tmp_path):
    """``tokenizer.eos_token: "\\n"``: a pretrained byte-level BPE's line-break token ("Ċ") serves as [EOS], so data
    gets the row the pretrained model already predicts at line ends; it decodes as the line break it is, and a run
    folder's tokenizer finds it again by name. A text of more than one token is a one-line error."""
    from difflm.errors import DiffLMError

    base = train_bpe(["the cat sat\n", "on the mat\n"] * 20, 300)
    nl = base.hf.encode("\n", add_special_tokens=False).ids
    assert len(nl) == 1 and base.hf.id_to_token(nl[0]) == "Ċ"
    base.hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_hf(str(tmp_path / "tokenizer.json"), eos_token="\n")
    assert tok.eos_id == nl[0] != base.eos_id
    assert tok.decode([*tok.encode("the cat"), tok.eos_id, *tok.encode("sat")]) == "the cat\nsat"
    tok.save(tmp_path / "t2.json")
    own = Tokenizer.load(tmp_path / "t2.json", "hf", special=tok.special)
    assert own.special == tok.special
    with pytest.raises(DiffLMError, match="no token 'the cat'"):
        load_hf(str(tmp_path / "tokenizer.json"), eos_token="the cat")


def test_a_training_run_keeps_its_configured_eos_token(tmp_path):
    """The trainer reloads the tokenizer it saved: the configured ``eos_token`` must survive that (it was lost, and
    a new [EOS] was added instead), in the run folder's recorded ids and in the data it trained on."""
    from difflm.config import RunConfig
    from difflm.pipeline import DiffusionLM
    from difflm.training.trainer import Trainer

    train_bpe(["the cat sat\n", "on the mat\n"] * 20, 300).hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "t.txt").write_text("the cat sat on the mat\nthe mat sat\n" * 30)
    run = RunConfig.from_dict({
        "data": {"corpus": "text", "path": str(tmp_path / "t.txt"), "seq_len": 16, "cache_dir": str(tmp_path / "c")},
        "tokenizer": {"type": "hf", "path": str(tmp_path / "tokenizer.json"), "eos_token": "\n"},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 16}, "process": {"type": "masked"},
        "train": {"batch_size": 4, "max_steps": 2, "eval_every": 10**6, "save_every": 10**6, "tensorboard": False,
                  "bf16": False}})
    Trainer(run, tmp_path / "run", progress=False).fit()
    lm = DiffusionLM.from_pretrained(tmp_path / "run")
    nl = lm.tokenizer.hf.token_to_id("Ċ")
    assert lm.tokenizer.eos_id == nl and lm.tokenizer.hf.token_to_id("[EOS]") != nl
    rows = build_dataset(lm.run.data, lm.tokenizer, "train").tokens
    assert (np.asarray(rows) == nl).sum() > 0 and lm.tokenizer.decode(rows[0]).count("\n") >= 1
    # a resumed run keeps the [EOS] its folder recorded, even one trained before the setting was honoured
    assert Trainer(run, tmp_path / "run", resume=True, progress=False)._tokenizer().eos_id == nl
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    old = Tokenizer.load(tmp_path / "run" / "tokenizer.json", "hf").eos_id  # an added [EOS], as the old trainer had
    (tmp_path / "run" / "config.json").write_text(json.dumps({**cfg, "special": {**cfg["special"], "eos": old}}))
    assert Trainer(run, tmp_path / "run", resume=True, progress=False)._tokenizer().eos_id == old != nl


def _bert_like() -> Tokenizer:
    """A small uncased BERT WordPiece tokenizer as its tokenizer.json lays it out: [unused*] rows, a piece only
    accents can spell, a three-dot piece, and [CLS]."""
    from tokenizers import normalizers, pre_tokenizers

    vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cafe", "é", "...", ".",
             "un", "##used", "##0", "[", "]", "a", "##b", "b"]
    hf = HFTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return Tokenizer(hf, "hf", eos_token="[SEP]", mask_token="[MASK]")


def test_unreachable_ids_are_the_rows_no_text_encodes_to():
    tok = _bert_like()
    names = {tok.hf.id_to_token(i) for i in tok.unreachable_ids()}
    # [unused0] → [ un ##used ##0 ]; é → e ([UNK] here); ... → . . .; [CLS] is BERT's, unused by difflm
    assert names == {"[unused0]", "[unused1]", "é", "...", "[CLS]"}
    assert not tok.unreachable_ids() & set(tok.special.values())  # [SEP] serves as [EOS], [MASK] is ours
    assert train_word(["the cat"]).unreachable_ids() == frozenset() == _bpe().unreachable_ids()


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="the cafe é É ... [unused0] [CL] ab bé", max_size=40))
def test_no_text_encodes_to_an_unreachable_id(text):
    """Plain text: the alphabet cannot spell "[CLS]", which a text that writes it literally does encode to."""
    tok = _bert_like()
    assert not set(tok.encode(text)) & tok.unreachable_ids()


@pytest.mark.parametrize("family", ["masked", "uniform"])
def test_exclude_unreachable_reaches_the_process_and_no_sample_holds_those_rows(tmp_path, family):
    """``tokenizer.exclude_unreachable``: a model folder rebuilds the process with those ids as never data, and
    samples (even from random weights, which spread mass over every row) never draw them; off, they are drawn."""
    import torch

    from difflm.components import build_components, write_model_folder
    from difflm.config import RunConfig
    from difflm.pipeline import DiffusionLM

    tok = _bert_like()
    (tmp_path / "t.txt").write_text("the cafe\n")
    bad = tok.unreachable_ids()
    drawn = {}
    for exclude in (True, False):
        run = RunConfig.from_dict({"tokenizer": {"type": "hf", "path": "unused", "exclude_unreachable": exclude},
                                   "model": {"n_layer": 1, "n_head": 2, "d_model": 16},
                                   "process": {"type": family}, "data": {"corpus": "text", "seq_len": 24,
                                                                        "path": str(tmp_path / "t.txt")}})
        torch.manual_seed(0)
        model, proc = build_components(run, tok)
        assert bad <= set(proc.never) if exclude else not bad & set(proc.never)
        write_model_folder(tmp_path / str(exclude), model.eval(), tok, run, None)
        lm = DiffusionLM.from_pretrained(tmp_path / str(exclude))
        assert set(lm.process.never) == set(proc.never)
        drawn[exclude] = set(lm.generate(8, 24, steps=8, seed=0).tokens.flatten().tolist())
    assert not drawn[True] & bad and drawn[False] & bad


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=30))
def test_byte_level_pieces_of_any_text_are_reachable(text):
    """A byte-level BPE read as a pretrained ("hf") tokenizer: its lone bytes of multi-byte characters decode alone
    to U+FFFD, and are still never called unreachable."""
    tok, unreachable = _bpe_as_hf()
    assert not set(tok.encode(text)) & unreachable


_BPE_HF = []


def _bpe_as_hf() -> tuple[Tokenizer, frozenset[int]]:
    if not _BPE_HF:  # computed once for the examples
        tok = Tokenizer(HFTokenizer.from_str(_bpe().hf.to_str()), "hf")
        _BPE_HF.append((tok, tok.unreachable_ids()))
    return _BPE_HF[0]


def _tiny_bert_like_run(tmp_path, **tokenizer) -> dict:
    """A one-step masked run on ``tmp_path/t.txt`` with _bert_like's tokenizer (saved to ``tmp_path``) and these
    ``tokenizer`` options."""
    _bert_like().hf.save(str(tmp_path / "tokenizer.json"))
    return {"tokenizer": {"type": "hf", "path": str(tmp_path / "tokenizer.json"), "eos_token": "[SEP]", **tokenizer},
            "model": {"n_layer": 1, "n_head": 2, "d_model": 16}, "process": {"type": "masked"},
            "data": {"corpus": "text", "path": str(tmp_path / "t.txt"), "seq_len": 8, "valid_fraction": 0.3,
                     "cache_dir": str(tmp_path / "cache")},
            "train": {"batch_size": 2, "max_steps": 1, "eval_every": 1, "eval_batches": 1, "tensorboard": False,
                      "bf16": False}}


def test_a_corpus_that_spells_out_an_excluded_token_is_refused_in_one_line(tmp_path):
    """[CLS] is unreachable from plain text but a text that writes it literally encodes to it; under
    exclude_unreachable that token would cost infinite nats, so training refuses the corpus and names the token."""
    from difflm.config import RunConfig
    from difflm.errors import DiffLMError
    from difflm.training.trainer import Trainer

    (tmp_path / "t.txt").write_text("the cafe\n" * 30 + "the [CLS] cafe\n" + "the cafe\n" * 30)
    cfg = _tiny_bert_like_run(tmp_path, exclude_unreachable=True)
    with pytest.raises(DiffLMError, match=r"holds '\[CLS\]', a token that tokenizer.exclude_unreachable"):
        Trainer(RunConfig.from_dict(cfg), tmp_path / "run", progress=False).fit()
    (tmp_path / "t.txt").write_text("the cafe\n" * 61)
    Trainer(RunConfig.from_dict(cfg), tmp_path / "run2", progress=False).fit()
    assert (tmp_path / "run2" / "model.safetensors").is_file()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["the", "cafe", "a", "<unk>", "b"]), max_size=12))
def test_unk_text_is_one_unknown_token_and_decodes_back(words):
    """``tokenizer.unk_text``: the corpus's ``<unk>`` is the tokenizer's own [UNK], one id, and decodes back to
    ``<unk>``; without it BERT's pre-tokenizer splits it into < unk > (here three [UNK], none in the vocabulary)."""
    tok = Tokenizer(HFTokenizer.from_str(_bert_like().hf.to_str()), "hf", eos_token="[SEP]", mask_token="[MASK]",
                    unk_text="<unk>")
    text = " ".join(words)
    ids = tok.encode(text)
    assert ids.count(tok.special["unk"]) == words.count("<unk>") and len(ids) == len(words)
    assert tok.decode(ids) == text == tok.decode(tok.encode_lines([text])[0])
    assert _bert_like().encode(text).count(tok.special["unk"]) == 3 * words.count("<unk>")


def test_unk_text_reaches_the_token_rows_and_the_model_folder(tmp_path):
    """Training rows hold one [UNK] per ``<unk>`` of the corpus (and the token cache keeps the two readings apart);
    the model folder reloads with the option, so samples and scores read and write ``<unk>`` as the corpus does."""
    from difflm.config import RunConfig
    from difflm.pipeline import DiffusionLM
    from difflm.training.trainer import Trainer

    (tmp_path / "t.txt").write_text("the <unk> cafe\n" * 40)
    rows = {}
    for unk_text in (None, "<unk>"):
        run = RunConfig.from_dict(_tiny_bert_like_run(tmp_path, unk_text=unk_text))
        out = tmp_path / f"run-{unk_text is not None}"
        Trainer(run, out, progress=False).fit()
        lm = DiffusionLM.from_pretrained(out)
        assert lm.tokenizer.unk_text == unk_text
        rows[unk_text] = np.asarray(build_dataset(run.data, lm.tokenizer, "train").tokens)
    unk = _bert_like().special["unk"]
    # "the <unk> cafe" + [SEP]: 4 ids a line with the option, 6 without (< unk > are three [UNK] here)
    assert (rows["<unk>"] == unk).sum() * 4 == rows["<unk>"].size
    assert (rows[None] == unk).sum() * 6 == rows[None].size * 3
    assert lm.tokenizer.decode(lm.encode_text("the <unk> cafe")) == "the <unk> cafe"


def test_unk_text_needs_a_tokenizer_with_an_unknown_token():
    from difflm.errors import DiffLMError

    with pytest.raises(DiffLMError, match="tokenizer.unk_text is for a pretrained tokenizer"):
        TokenizerConfig(type="word", unk_text="<unk>")
    with pytest.raises(DiffLMError, match="tokenizer.unk_text is for a pretrained tokenizer"):
        TokenizerConfig(type="hf", path="x", unk_text=" ")
    with pytest.raises(DiffLMError, match="has no unknown token to read it as"):
        Tokenizer(HFTokenizer.from_str(_bpe().hf.to_str()), "hf", unk_text="<unk>")
    for bad in (["N N"], [""], "N", ["N", 3]):
        with pytest.raises(DiffLMError, match="tokenizer.add_words is for a pretrained tokenizer"):
            TokenizerConfig(type="hf", path="x", add_words=bad)
    with pytest.raises(DiffLMError, match="tokenizer.add_words is for a pretrained tokenizer"):
        TokenizerConfig(type="bpe", add_words=["N"])


_ADDED = []


def _bert_like_with_added_words(tmp_path_factory) -> tuple[Tokenizer, Tokenizer]:
    """_bert_like with N added (an uncased tokenizer that has no "n" either: N alone is [UNK]) and the abbreviation
    "a.b." (which the pre-tokenizer would split at its dots, as it splits PTB's "u.s."), as built and as a run folder
    reloads it from its tokenizer.json."""
    if not _ADDED:
        d = tmp_path_factory.mktemp("addn")
        _bert_like().hf.save(str(d / "base.json"))
        built = load_hf(str(d / "base.json"), eos_token="[SEP]", unk_text="<unk>", add_words=["N", "a.b."])
        built.save(d / "tokenizer.json")
        _ADDED.append((built, Tokenizer.load(d / "tokenizer.json", "hf", built.special, unk_text="<unk>")))
    return _ADDED[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["the", "cafe", "N", "<unk>", "a", "b", ".", "a.b."]), max_size=12))
def test_add_words_are_one_new_token_each_kept_as_written(tmp_path_factory, words):
    """``tokenizer.add_words: [N, a.b.]``: each is one token with its own new row, read before the uncased normaliser
    lowercases N and the pre-tokenizer splits a.b. at its dots, and decodes back as written (not "n", not
    "a . b ."); the run folder's saved tokenizer reads them the same way."""
    built, reloaded = _bert_like_with_added_words(tmp_path_factory)
    new = {w: built.hf.token_to_id(w) for w in ("N", "a.b.")}
    base = _bert_like().hf.get_vocab_size(with_added_tokens=False)
    assert all(i is not None and i >= base and i not in built.special.values() for i in new.values())
    text = " ".join(words)
    ids = built.encode(text)
    assert ids == reloaded.encode(text) and len(ids) == len(words)
    assert all(ids.count(i) == words.count(w) for w, i in new.items())
    assert built.decode(ids) == text == reloaded.decode(ids)
    assert not set(_bert_like().encode(text)) & set(new.values())  # without them: [UNK], and a . b .


def test_add_words_refuses_a_word_that_is_already_one_token(tmp_path):
    from difflm.errors import DiffLMError

    _bert_like().hf.save(str(tmp_path / "t.json"))
    with pytest.raises(DiffLMError, match="'cafe' is already one token"):
        load_hf(str(tmp_path / "t.json"), add_words=["N", "cafe"])


def test_decode_cleanup_false_writes_a_pretokenized_corpus_back_as_written(tmp_path):
    """BERT's WordPiece decoder cleans up: "said ." → "said.", which a word-level judge reads as one unknown word;
    ``tokenizer.decode_cleanup: false`` keeps PTB's spacing (and the saved tokenizer.json keeps the setting)."""
    from tokenizers import decoders

    from difflm.errors import DiffLMError

    hf = HFTokenizer.from_str(_bert_like().hf.to_str())
    hf.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    hf.save(str(tmp_path / "t.json"))
    text = "the cafe . a . b"  # "," is not in the vocabulary
    assert load_hf(str(tmp_path / "t.json")).decode(load_hf(str(tmp_path / "t.json")).encode(text)) == "the cafe. a. b"
    tok = load_hf(str(tmp_path / "t.json"), decode_cleanup=False)
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "saved.json")
    again = Tokenizer.load(tmp_path / "saved.json", "hf", tok.special)
    assert again.decode(again.encode(text)) == text
    _bpe().hf.save(str(tmp_path / "bpe.json"))
    with pytest.raises(DiffLMError, match="has a ByteLevel decoder, which has no clean-up to set"):
        load_hf(str(tmp_path / "bpe.json"), decode_cleanup=False)
    with pytest.raises(DiffLMError, match="tokenizer.decode_cleanup is for a pretrained tokenizer"):
        TokenizerConfig(type="word", decode_cleanup=False)
