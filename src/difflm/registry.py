"""Where families, samplers and backbones declare themselves. Everything that lists them — config validation,
``build_process``, the default sampler, ``bench-sampling``'s sweep, the CLI's ``--sampler`` choices and
sampler flags — reads these registries, so adding one is a class with a decorator in its own file:

    @register_family                      # diffusion/<family>.py: family, Options, default_sampler,
    class MyProcess(Process): ...          #   backbone_needs()
    @register_sampler                     # sampling/<name>.py: name, families, Options, bench, step_free
    class MySampler(Sampler): ...
    @register_backbone                    # models/<name>.py: kind, Config
    class MyBackbone(nn.Module): ...

Packages outside difflm register through the entry-point group ``difflm.plugins`` (each entry point names a
module, imported before the registries are first read), so a run folder of a plugin family loads by name.
This module imports nothing heavy: the built-in families, samplers and backbones register when
``difflm.diffusion``, ``difflm.sampling`` and ``difflm.models`` are imported, which ``ensure_loaded`` does.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import DiffLMError

DEFAULT_FAMILY = "masked"  # process.type when a config names none
DEFAULT_BACKBONE = "transformer"  # model.type when a config names none

_FAMILIES: dict[str, type] = {}
_SAMPLERS: list[type] = []  # registration order: the order bench-sampling runs them in
_BACKBONES: dict[str, type] = {}
_loaded = False


def option(default: Any, help: str = "", *, flag: str | None = None, cli: bool = True, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field of a config section or of a family's or sampler's options, with its help text and
    the bounds a number must keep (ge ≤ x, gt < x, x ≤ le, x < lt; checked when the value is read, NaN and
    ±inf refused). ``flag``: the command-line flag when it is not ``--name`` (e.g. ``--no-kv-cache`` for
    ``cache: bool = True``); ``cli=False``: set from Python only (an object such as a classifier guide)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "flag": flag, "cli": cli, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def derived(default: Any) -> Any:
    """A backbone-config field filled in by ``with_needs`` (vocabulary, length, the family's needs), never set
    in a config file."""
    return field(default=default, metadata={"derived": True})


def derived_fields(config_cls: type) -> set[str]:
    """The names of a backbone config's ``derived`` fields."""
    return {f.name for f in dataclasses.fields(config_cls) if f.metadata.get("derived")}


def bounds_text(bounds: dict) -> str:
    """e.g. '≥ 1', '> 0 and ≤ 1'."""
    sym = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return " and ".join(f"{sym[k]} {v:g}" for k, v in bounds.items())


_HOLDS = {"ge": lambda x, b: x >= b, "gt": lambda x, b: x > b, "le": lambda x, b: x <= b, "lt": lambda x, b: x < b}


def check_value(key: str, value: Any, meta: Any) -> None:
    """A one-line error when a number breaks the bounds declared in its field's metadata (or is NaN/inf)."""
    bounds = meta.get("bounds") if meta else None
    if not bounds or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value) or not all(_HOLDS[k](value, b) for k, b in bounds.items()):
        raise DiffLMError(f"{key} must be {bounds_text(bounds)}, got {value!r}")


def check_bounds(obj: Any, where: str) -> None:
    """Check every bounded field of a dataclass instance (``where``: the key prefix, e.g. 'train.')."""
    for f in dataclasses.fields(obj):
        check_value(where + f.name, getattr(obj, f.name), f.metadata)


@dataclass
class NoOptions:
    """The options of a family or sampler that has none."""


@dataclass(frozen=True)
class BackboneNeeds:
    """What a family asks of its network; ``components.build_components`` fills the backbone's config from it.

    attention: "bidirectional", "causal" (next-token prediction) or "block-causal" (the process passes its own
    block masks and positions per call; the backbone itself is bidirectional).
    time_conditioning: the network reads t (adaLN). d_embed > 0: embedding diffusion, the network maps noisy
    embeddings (B, L, d_embed) to x̂0 embeddings. self_conditioning: the previous x̂0 is a second input.
    aux_outputs > 0: a second output head of that width per position, read with ``model(x, head="aux")`` (the
    edit family's tagger). input_marks > 0: the network adds a learned embedding of a per-position mark
    (0..input_marks−1, read with ``model(x, marks=...)``; the edit family's generator reads which tokens its
    revision keeps, deletes or fills).
    """

    attention: str = "bidirectional"
    time_conditioning: bool = False
    d_embed: int = 0
    self_conditioning: bool = False
    aux_outputs: int = 0
    input_marks: int = 0


# -- registration ------------------------------------------------------------------------------------
def register_family(cls: type) -> type:
    """Class decorator for a Process subclass: ``family`` (the config's process.type), ``Options`` (a
    dataclass of its config keys), ``default_sampler`` and ``backbone_needs``."""
    for attr in ("family", "Options", "default_sampler"):
        if attr not in vars(cls):
            raise TypeError(f"{cls.__name__} must declare {attr} to be registered as a family")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    cls.Options.family = cls.family  # an options instance knows its family (RunConfig.process.family)
    _FAMILIES[cls.family] = cls
    return cls


def register_sampler(cls: type) -> type:
    """Class decorator for a Sampler subclass: ``name``, ``families`` it fits, ``Options`` (dataclass, with
    ``option(...)`` fields), ``bench`` (the option settings bench-sampling runs) and ``step_free``."""
    if "name" not in vars(cls) or not cls.families:
        raise TypeError(f"{cls.__name__} must declare name and families to be registered as a sampler")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    _SAMPLERS[:] = [c for c in _SAMPLERS if not (c.name == cls.name and set(c.families) & set(cls.families))]
    _SAMPLERS.append(cls)
    return cls


def register_backbone(cls: type) -> type:
    """Class decorator for a denoiser network built as ``cls(config)``: ``kind`` (the config's model.type) and
    ``Config``, a dataclass whose fields marked ``derived`` (metadata) are not configured but filled in by its
    ``with_needs(needs: BackboneNeeds, vocab_size, max_len)`` — the family's needs, the tokenizer's vocabulary
    and data.seq_len. The module takes the transformer's call signature and has ``pretrained_init()`` (load the
    weights a fresh training run starts from, if its config names any; returns whether it did) and
    ``set_step(step)`` (the trainer announces each optimizer step)."""
    config = getattr(cls, "Config", None)
    if "kind" not in vars(cls) or not dataclasses.is_dataclass(config) or not hasattr(config, "with_needs") \
            or not all(callable(getattr(cls, m, None)) for m in ("pretrained_init", "set_step")):
        raise TypeError(f"{cls.__name__} must declare kind, a Config dataclass with with_needs(), pretrained_init() "
                        "and set_step() to be registered as a backbone")
    _BACKBONES[cls.kind] = cls
    return cls


@contextmanager
def registered(*classes: type) -> Iterator[None]:
    """Register families, samplers or backbones for the duration of a ``with`` block (tests, notebooks)."""
    saved = dict(_FAMILIES), list(_SAMPLERS), dict(_BACKBONES)
    try:
        for c in classes:
            if hasattr(c, "kind") and hasattr(c, "Config"):
                register_backbone(c)
            elif hasattr(c, "default_sampler"):
                register_family(c)
            else:
                register_sampler(c)
        yield
    finally:
        _FAMILIES.clear()
        _FAMILIES.update(saved[0])
        _SAMPLERS[:] = saved[1]
        _BACKBONES.clear()
        _BACKBONES.update(saved[2])


def ensure_loaded() -> None:
    """Import the built-in families, samplers and backbones, and any ``difflm.plugins`` entry points."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in ("difflm.diffusion", "difflm.sampling", "difflm.models"):
        importlib.import_module(mod)
    try:
        from importlib.metadata import entry_points

        plugins = entry_points(group="difflm.plugins")
    except Exception:  # noqa: BLE001 - a broken distribution's metadata must not stop difflm
        plugins = []
    for ep in plugins:
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001
            raise DiffLMError(f"the difflm plugin {ep.name} ({ep.value}) failed to import: {e}") from None


# -- lookup --------------------------------------------------------------------------------------------
def families() -> dict[str, type]:
    """name -> Process class, in registration order."""
    ensure_loaded()
    return dict(_FAMILIES)


def family(name: str) -> type:
    """The Process class of ``process.type`` ``name``, or a one-line error listing the families."""
    fams = families()
    if name not in fams:
        raise DiffLMError(f"unknown process.type {name!r}; choose one of {', '.join(fams)}")
    return fams[name]


def samplers(family_name: str | None = None) -> list[type]:
    """Every registered sampler class (those that fit ``family_name`` when given), in registration order."""
    ensure_loaded()
    return [c for c in _SAMPLERS if family_name is None or family_name in c.families]


def sampler_names() -> list[str]:
    return sorted({c.name for c in samplers()})


def sampler_class(name: str, family_name: str) -> type:
    """The sampler called ``name`` for a ``family_name`` model, or a one-line error saying which fit."""
    known = sampler_names()
    if name not in known:
        raise DiffLMError(f"unknown sampler {name!r}; choose one of {', '.join(known)}")
    for c in samplers(family_name):
        if c.name == name:
            return c
    fits = [c.name for c in samplers(family_name)]
    raise DiffLMError(f"sampler {name!r} does not fit a {family_name} model; use one of: {', '.join(fits)}")


def backbones() -> dict[str, type]:
    ensure_loaded()
    return dict(_BACKBONES)


def backbone(kind: str) -> type:
    bbs = backbones()
    if kind not in bbs:
        raise DiffLMError(f"unknown model.type {kind!r}; choose one of {', '.join(bbs)}")
    return bbs[kind]


def backbone_kind(config: Any) -> str:
    """The model.type whose Config is ``config``'s class."""
    for kind, cls in backbones().items():
        if type(config) is cls.Config:
            return kind
    raise DiffLMError(f"{type(config).__name__} is not the config of a registered backbone")


# -- options -------------------------------------------------------------------------------------------
def option_fields(options_cls: type, cli_only: bool = False) -> list[dataclasses.Field]:
    """The fields of an Options dataclass (those settable on the command line with ``cli_only``)."""
    return [f for f in dataclasses.fields(options_cls) if not (cli_only and not f.metadata.get("cli", True))]


def option_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def make_options(options_cls: type, values: dict, owner: str) -> Any:
    """``options_cls(**values)``, with unknown keys a one-line error naming ``owner``'s real options."""
    names = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise DiffLMError(f"{owner} has no option {', '.join(unknown)}; its options: {', '.join(names) or 'none'}")
    try:
        opts = options_cls(**values)
    except TypeError as e:
        raise DiffLMError(f"bad options for {owner}: {e}") from None
    check_bounds(opts, f"{owner}: ")
    return opts
