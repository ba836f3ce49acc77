"""Run configuration: YAML presets -> typed dataclasses, with ``--set key=value`` overrides.

A run's config.json holds everything needed to rebuild model, process, schedule and tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import DiffLMError
from .registry import check_bounds, option

# presets live in the repository's configs/ (found from the source tree or the working directory)
CONFIG_DIRS = (Path(__file__).resolve().parents[2] / "configs", Path.cwd() / "configs")


@dataclass
class DataConfig:
    corpus: str = "ptb"  # ptb | text | pairs (JSONL {"source", "target"}) | scenes (captioned images); pairs layout
    path: str | list[str] | None = None  # text file(s) for corpus: text; a folder or .jsonl for pairs; scenes: the
    # Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)
    valid_path: str | None = None
    test_path: str | None = None
    valid_fraction: float = option(0.1, "tail of the text used for validation when valid_path is not given",
                                   ge=0, lt=1)
    test_fraction: float = option(0.0, ge=0, lt=1)
    mode: str = "packed"  # packed: blocks of the token stream; lines: one padded line each; pairs: seq2seq
    seq_len: int = option(128, "tokens per row", ge=2)
    cache_dir: str | None = None  # where tokenized arrays are memory-mapped (default ~/.cache/difflm)
    target_length: str = option("eos", "pairs: eos — the model writes the target and the [EOS] fill after it, the "
                                "length where the first [EOS] lands; predicted — an encoder-decoder predicts the "
                                "length from the source (Mask-Predict) and the fill after the target is given")
    scenes: int = option(20000, "scenes: training scenes (each with its reference captions as rows)", ge=1)
    eval_scenes: int = option(500, "scenes: valid and test scenes each", ge=1)
    scene_items: str | int = option("2-4", "scenes: items per scene, a count or a range within 1-4 (1: plain-class "
                              "captions, the sanity row)")
    scene_classes: list[str] | None = None  # scenes: the Fashion-MNIST classes drawn (default all ten)
    scene_seed: int = option(0, "scenes: the generator's seed (scene i of a split is a function of it)", ge=0)
    scene_stream: bool = option(False, "scenes: every training row draws a fresh scene (row r of the run is scene r "
                                "of the seeded sequence whose first data.scenes scenes are the fixed set; those still "
                                "train the tokenizer and give the length prior)")
    stream_start: int = option(0, "scenes: with data.scene_stream, row r of the run is scene stream_start + r (a run "
                               "adapted from another continues its stream past the scenes that one saw)", ge=0)

    def __post_init__(self) -> None:
        if self.corpus in ("pairs", "scenes") and self.mode == "packed":
            self.mode = "pairs"  # the only layout source/target pairs (and image/caption pairs) have
        if (self.corpus in ("pairs", "scenes")) != (self.mode == "pairs"):
            raise DiffLMError("data.mode pairs goes with data.corpus pairs (JSONL source/target) or scenes, and only "
                              "with them")
        from .data.scenes import class_ids, parse_items

        parse_items(self.scene_items)  # checked whatever the corpus: a bad value is an error, never silently unused
        if self.scene_stream and self.corpus != "scenes":
            raise DiffLMError("data.scene_stream draws captioning scenes: it needs data.corpus scenes")
        if self.stream_start and not self.scene_stream:
            raise DiffLMError("data.stream_start is where the scene stream starts: it needs data.scene_stream true")
        class_ids(self.scene_classes)
        if self.target_length not in ("eos", "predicted"):
            raise DiffLMError(f"data.target_length must be eos or predicted, got {self.target_length!r}")
        if self.target_length == "predicted" and self.mode != "pairs":
            raise DiffLMError("data.target_length predicted is for seq2seq pairs (data.corpus pairs)")


@dataclass
class TokenizerConfig:
    type: str = "word"  # char | word | bpe | hf
    vocab_size: int = option(8192, "bpe: vocabulary size", ge=16)
    min_count: int = option(1, "word: drop words seen fewer times", ge=1)
    path: str | None = None  # hf
    eos_token: str | None = option(None, "hf: a token of the tokenizer (or a text that is one token) that serves "
                                   "as end of text instead of an added [EOS] (BERT's [SEP], GPT-2's <|endoftext|>, "
                                   "\"\\n\": a pretrained model's line break)")
    exclude_unreachable: bool = option(False, "hf: give zero mass, as [MASK] and [PAD] have, to the vocabulary rows no "
                                       "text encodes to (BERT's [unused*] and [CLS], pieces its normaliser cannot "
                                       "produce: Tokenizer.unreachable_ids), so no sample holds them")
    unk_text: str | None = option(None, "hf: the corpus's spelling of an unknown word (PTB's \"<unk>\"), read as "
                                  "the tokenizer's own unknown token ([UNK]: one id, not the pieces < un ##k >) and "
                                  "written back as this spelling")
    add_words: list[str] | None = option(None, "hf: words of the corpus that the pretrained tokenizer splits or "
                                         "changes (PTB's N, which an uncased BERT writes as n), each made one token "
                                         "with a new row, matched as a whole word before normalisation and written "
                                         "back as is")
    decode_cleanup: bool | None = option(None, "hf: null keeps the tokenizer's own; false stops a WordPiece decoder's "
                                         "clean-up joining punctuation to the word before it (\"said .\" → "
                                         "\"said.\"), so text of a pre-tokenized corpus (PTB) reads back as written")

    def __post_init__(self) -> None:
        if self.unk_text is not None and (self.type != "hf" or not self.unk_text.strip()):
            raise DiffLMError("tokenizer.unk_text is for a pretrained tokenizer (type hf) and must be a non-blank "
                              "text; a tokenizer trained on the corpus learns its spelling of unknown words as a word")
        if self.add_words is not None and (self.type != "hf" or not isinstance(self.add_words, list) or any(
                not isinstance(w, str) or not w or len(w.split()) != 1 or w != w.strip() for w in self.add_words)):
            raise DiffLMError("tokenizer.add_words is for a pretrained tokenizer (type hf): a list of words without "
                              "spaces, e.g. [N]")
        if self.decode_cleanup is not None and self.type != "hf":
            raise DiffLMError("tokenizer.decode_cleanup is for a pretrained tokenizer (type hf); difflm's own "
                              "tokenizers write text back as the corpus wrote it")


@dataclass
class TrainConfig:
    batch_size: int = option(32, "global batch: sequences per optimizer step, over all ranks and accumulation", ge=1)
    grad_accum: int = option(1, ge=1)
    max_steps: int = option(1000, ge=1)
    max_minutes: float | None = option(None, "also stop (evaluate and save) once training has run this many minutes "
                                       "in all: runs compared at equal wall time", gt=0)
    lr: float = option(1e-3, gt=0)
    min_lr_ratio: float = option(0.1, ge=0, le=1)
    warmup_steps: int = option(100, ge=0)
    decay_minutes: float | None = option(None, "run the cosine decay over this many minutes of training time "
                                         "instead of over max_steps (a wall-time budget: set it to max_minutes)",
                                         gt=0)
    weight_decay: float = option(0.0, ge=0)
    beta1: float = option(0.9, ge=0, lt=1)
    beta2: float = option(0.98, ge=0, lt=1)
    clip: float = option(1.0, "gradient-norm clip (0: none)", ge=0)
    ema: float = option(0.9999, ge=0, lt=1)
    bf16: bool = True
    eval_every: int = option(500, ge=1)
    eval_batches: int = option(20, ge=1)
    save_every: int = option(250, ge=1)
    log_every: int = option(10, ge=1)
    seed: int = option(0, ge=0)
    tensorboard: bool = True
    threads: int | None = option(None, ge=1)
    cond_dropout: float = option(0.0, "seq2seq: fraction of rows trained with the source dropped (classifier-free "
                                 "guidance)", ge=0, lt=1)


@dataclass
class SampleConfig:
    sampler: str | None = None
    steps: int = option(128, ge=1)
    temperature: float = option(1.0, gt=0)
    top_p: float = option(1.0, gt=0, le=1)
    options: dict = option({}, "the default sampler's own options (e.g. {greedy: true} for an AR captioner), used "
                               "when a job names no sampler; a job's own options override them")

    def __post_init__(self) -> None:
        if self.options and self.sampler is None:
            raise DiffLMError("sample.options are a sampler's options: name the sampler too (sample.sampler)")


@dataclass
class RunConfig:
    """A run. ``model`` is the config dataclass of the backbone that ``model.type`` names (default: the
    transformer's), ``process`` the options dataclass of the family that ``process.type`` names; both are
    typed and checked when read (``registry``)."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: Any = None
    process: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.model is None or isinstance(self.model, dict):
            self.model = model_config(self.model or {})
        given = self.process is not None  # from_dict sets the real process after construction, then checks
        if self.process is None or isinstance(self.process, dict):
            self.process = process_options(self.process or {})
        if given:
            self._check_sample()

    def _check_sample(self) -> None:
        """sample.sampler must name a sampler, and sample.options must be that sampler's options when it fits the
        family (a swapped family runs its own default sampler and ignores both): a typo fails when the config is
        read, not at the first ``sample`` after training."""
        from . import registry

        name = self.sample.sampler
        if name is None:
            return
        if name not in registry.sampler_names():
            raise DiffLMError(f"sample.sampler {name!r} is not a sampler; choose one of "
                              f"{', '.join(registry.sampler_names())}")
        fits = [c for c in registry.samplers(self.family) if c.name == name]
        if fits:
            registry.make_options(fits[0].Options, self.sample.options, f"sample.options of sampler {name!r}")

    @property
    def family(self) -> str:
        """process.type"""
        return self.process.family

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}
        out["model"] = model_dict(self.model)
        out["process"] = {"type": self.process.family, **dataclasses.asdict(self.process)}
        return out

    @classmethod
    def from_saved(cls, d: dict) -> RunConfig:
        """A run folder's config (config.json's ``run``): ``from_dict``, where a section that predates an option
        (``EARLIER``) gets the value the run was trained and sampled with, not today's default."""
        return cls.from_dict(with_earlier(d))

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        if not isinstance(d, dict):
            raise DiffLMError(f"a config must be a mapping of sections, got {type(d).__name__}")
        d = dict(d)
        model, process = d.pop("model", None), d.pop("process", None)
        run = _build(cls, d, "")
        run.model = model_config({} if model is None else model)
        run.process = process_options({} if process is None else process)
        run._check_sample()
        return run


# options added after run folders had been saved: (section, type) -> the value that a saved run lacking the key
# behaved as (``RunConfig.from_saved``)
EARLIER: dict[tuple[str, str], dict[str, Any]] = {("process", "edit"): {"padding": "attended", "align": "tokens",
                                                                        "generator_input": "edited"},
                                                   ("process", "editflow"): {"align": "tokens"}}


def with_earlier(run: Any) -> Any:
    """A saved run's config (a mapping) with the ``EARLIER`` value of every option its sections predate."""
    if not isinstance(run, dict):
        return run
    run = dict(run)
    for (section, kind), opts in EARLIER.items():
        sec = run.get(section)
        if isinstance(sec, dict) and sec.get("type") == kind:
            run[section] = {**opts, **sec}
    return run


def process_options(d: Any) -> Any:
    """The ``process`` section -> the options dataclass of the family its ``type`` names (attribute
    ``family`` set on the instance's class)."""
    from . import registry

    if dataclasses.is_dataclass(d):
        return d
    if not isinstance(d, dict):
        raise DiffLMError(f"config section process must be a mapping, got {type(d).__name__}")
    d = dict(d)
    kind = d.pop("type", registry.DEFAULT_FAMILY)
    cls = registry.family(str(kind))
    return _build(cls.Options, d, "process.", owner=f"process.type {kind}")


def model_config(d: Any) -> Any:
    """The ``model`` section -> the Config dataclass of the backbone its ``type`` names; its ``derived``
    fields (vocabulary, length, what the family needs) are not configurable."""
    from . import registry

    if dataclasses.is_dataclass(d):
        return d
    if not isinstance(d, dict):
        raise DiffLMError(f"config section model must be a mapping, got {type(d).__name__}")
    d = dict(d)
    kind = str(d.pop("type", registry.DEFAULT_BACKBONE))
    cls = registry.backbone(kind).Config
    derived = sorted(k for k in d if k in registry.derived_fields(cls))
    if derived:
        raise DiffLMError(f"model.{derived[0]} is set from the tokenizer, data.seq_len and the family, not in the "
                          f"config; remove it")
    return _build(cls, d, "model.", skip=registry.derived_fields(cls))


def model_dict(cfg: Any) -> dict:
    """A backbone config as the ``model`` section: its type and its configurable fields."""
    from . import registry

    derived = registry.derived_fields(type(cfg))
    return {"type": registry.backbone_kind(cfg),
            **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in derived}}



def _build(cls, d: Any, where: str, owner: str | None = None, skip: set[str] = frozenset()):
    """``cls(**d)`` for a dataclass, each value checked against the field's annotation; unknown keys and
    wrong types are one-line errors naming the key."""
    if not isinstance(d, dict):
        raise DiffLMError(f"config section {where.rstrip('.') or 'root'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise DiffLMError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}"
            + (f" for {owner}" if owner else "") + f"; valid keys here: {', '.join(sorted(fields)) or 'none'}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            kwargs[k] = _build(hint, v, f"{where}{k}.")
        else:
            kwargs[k] = coerce(v, hint, where + k)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise DiffLMError(f"bad config section {where.rstrip('.') or 'root'}: {e}") from None
    check_bounds(obj, where)
    return obj


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint) or hint
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            list: "a list"}.get(origin, getattr(origin, "__name__", str(origin)))


def coerce(v: Any, hint: Any, key: str) -> Any:
    """``v`` as the type ``hint`` (int, float, bool, str, dict, list[...], Literal, unions, Any), or a one-line
    error naming ``key``. YAML 1.1 reads 2e-3 (no dot) as a string: a number field parses it."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return v
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(hint):
            try:
                return coerce(v, arg, key)
            except DiffLMError:
                continue
        raise DiffLMError(f"config key {key} must be {_type_name(hint)}, got {v!r}")
    if hint is type(None):
        if v is None:
            return None
    elif origin is typing.Literal:
        if v in typing.get_args(hint) and type(v) is not bool:
            return v
        raise DiffLMError(f"config key {key} must be one of {', '.join(map(str, typing.get_args(hint)))}, got {v!r}")
    elif hint is bool:
        if isinstance(v, bool):
            return v
    elif hint in (int, float):
        if hint is float and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if hint is int and not (math.isfinite(v) and float(v) == int(v)):
                raise DiffLMError(f"config key {key} must be an integer, got {v!r}")
            return hint(v)
    elif hint is str:
        if isinstance(v, str):
            return v
    elif (origin or hint) is dict:
        if isinstance(v, dict):
            return v
    elif (origin or hint) is list:
        if isinstance(v, (list, tuple)):
            args = typing.get_args(hint)
            return [coerce(x, args[0], f"{key}[{i}]") for i, x in enumerate(v)] if args else list(v)
    else:
        raise TypeError(f"config annotation {hint!r} of {key} is not supported")
    raise DiffLMError(f"config key {key} must be {_type_name(hint)}, got {v!r}")


def set_key(d: dict, dotted: str, value: Any) -> None:
    """d['a']['b'] = value for dotted 'a.b' (creating sections as needed)."""
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise DiffLMError(f"--set {dotted}: {p} is not a section")
    d[last] = value


def preset_path(name_or_path: str) -> Path:
    """A preset name (configs/NAME.yaml, shipped with the package) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for d in CONFIG_DIRS:
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    names = ", ".join(sorted({q.stem for d in CONFIG_DIRS for q in d.glob("*.yaml")}))
    raise DiffLMError(f"config {name_or_path!r} not found: give a YAML file or a preset ({names})")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML preset/file — or a run folder / its config.json, whose ``run`` section is the config — and
    apply ``key=value`` overrides (values parsed as YAML)."""
    p = Path(name_or_path)
    path = p / "config.json" if p.is_dir() else preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffLMError(f"{path} not found: {p} is not a run folder") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DiffLMError(f"{path} is not valid YAML: {_one_line(e)}") from None
    if isinstance(raw, dict) and "difflm_version" in raw and isinstance(raw.get("run"), dict):
        raw, stem = with_earlier(raw["run"]), raw["run"].get("name", p.stem)  # a run's config.json
    else:
        stem = path.stem
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise DiffLMError(f"{path} must hold a mapping of config sections (data, model, process, train, ...), "
                          f"not a {type(raw).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise DiffLMError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise DiffLMError(f"--set {k.strip()}: the value is not valid YAML ({_one_line(e)})") from None
        set_key(raw, k.strip(), value)
    raw.setdefault("name", stem)
    return RunConfig.from_dict(raw)
