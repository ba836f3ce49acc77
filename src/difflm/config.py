"""Run configuration: YAML presets -> typed dataclasses, with ``--set key=value`` overrides.

A run's config.json holds everything needed to rebuild model, process, schedule and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import DiffLMError

# presets live in the repository's configs/ (found from the source tree or the working directory)
CONFIG_DIRS = (Path(__file__).resolve().parents[2] / "configs", Path.cwd() / "configs")


@dataclass
class DataConfig:
    corpus: str = "ptb"  # ptb | text | pairs (JSONL {"source", "target"}; needs mode: pairs)
    path: str | list[str] | None = None  # text file(s) for corpus: text; a folder or .jsonl for pairs
    valid_path: str | None = None
    test_path: str | None = None
    valid_fraction: float = 0.1  # tail of the text used for validation when valid_path is not given
    test_fraction: float = 0.0
    mode: str = "packed"  # packed: blocks of the token stream; lines: one padded line each; pairs: seq2seq
    seq_len: int = 128
    cache_dir: str | None = None  # where tokenized arrays are memory-mapped (default ~/.cache/difflm)

    def __post_init__(self) -> None:
        if self.corpus == "pairs" and self.mode == "packed":
            self.mode = "pairs"  # the only layout source/target pairs have
        if (self.corpus == "pairs") != (self.mode == "pairs"):
            raise DiffLMError("data.mode pairs goes with data.corpus pairs (JSONL source/target), and only with it")


@dataclass
class TokenizerConfig:
    type: str = "word"  # char | word | bpe | hf
    vocab_size: int = 8192  # bpe
    min_count: int = 1  # word
    path: str | None = None  # hf


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class TrainConfig:
    batch_size: int = 32  # global batch (sequences per optimizer step, over all ranks and accumulation)
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    clip: float = 1.0
    ema: float = 0.9999
    bf16: bool = True
    eval_every: int = 500
    eval_batches: int = 20
    save_every: int = 250
    log_every: int = 10
    seed: int = 0
    tensorboard: bool = True
    threads: int | None = None
    cond_dropout: float = 0.0  # seq2seq: fraction of rows trained with the source dropped (classifier-free guidance)


@dataclass
class SampleConfig:
    sampler: str | None = None
    steps: int = 128
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    process: dict = field(default_factory=lambda: {"type": "masked"})
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return _build(cls, d, "")


def _build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise DiffLMError(f"config section {where or 'root'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise DiffLMError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for k, v in d.items():
        f = fields[k]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[k] = _build(type(default), v, f"{where}{k}.")
        else:
            kwargs[k] = _coerce(v, default, where + k)
    return cls(**kwargs)


def _coerce(v: Any, default: Any, key: str) -> Any:
    if default is None or v is None or isinstance(default, (dict, list)):
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise DiffLMError(f"config key {key} must be true or false, got {v!r}")
        return v
    if isinstance(default, float) and isinstance(v, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(default, (int, float)) and not isinstance(v, bool) and isinstance(v, (int, float)):
        if isinstance(default, int) and not isinstance(default, bool) and float(v) != int(v):
            raise DiffLMError(f"config key {key} must be an integer, got {v!r}")
        return type(default)(v)
    if isinstance(default, str) and isinstance(v, str):
        return v
    raise DiffLMError(f"config key {key} must be a {type(default).__name__}, got {v!r}")


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


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML preset/file and apply ``key=value`` overrides (values parsed as YAML)."""
    path = preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DiffLMError(f"{path} is not valid YAML: {e}") from None
    for item in overrides or []:
        if "=" not in item:
            raise DiffLMError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        set_key(raw, k.strip(), yaml.safe_load(v))
    raw.setdefault("name", path.stem)
    return RunConfig.from_dict(raw)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffLMError(f"{path} not found: is {path.parent} a difflm model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffLMError(f"{path} is corrupted ({e}); restore it or retrain") from None
