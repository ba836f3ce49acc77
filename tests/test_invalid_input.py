"""Property: any invalid value for any numeric config key or command-line option is one line on stderr,
exit code 2, no traceback, and nothing in the run folder changes. The keys and their bounds are read from the
config dataclasses and option declarations themselves, so a new key is covered when it is declared."""

from __future__ import annotations

import dataclasses
import math
import shutil
import typing
from pathlib import Path

import pytest
from conftest import one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difflm import registry
from difflm.cli import main
from difflm.config import DataConfig, SampleConfig, TokenizerConfig, TrainConfig

LEGACY = Path(__file__).parent / "fixtures" / "legacy_runs"


def _numeric(cls, prefix: str) -> list[tuple[str, type, dict]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):
            continue
        args = [a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None)]
        kind = next((a for a in args if a in (int, float)), None)
        if kind is not None:
            out.append((prefix + f.name, kind, f.metadata.get("bounds", {})))
    return out


def numeric_config_keys() -> list[tuple[str, type, dict, str | None]]:
    """(dotted key, int/float, bounds, family or None) for every numeric config key."""
    keys = [(*k, None) for cls, p in ((DataConfig, "data."), (TokenizerConfig, "tokenizer."), (TrainConfig, "train."),
                                      (SampleConfig, "sample.")) for k in _numeric(cls, p)]
    keys += [(*k, None) for k in _numeric(registry.backbone("transformer").Config, "model.")]
    for name, fam in registry.families().items():
        keys += [(*k, name) for k in _numeric(fam.Options, "process.")]
    return keys


KEYS = numeric_config_keys()


def invalid(kind: type, bounds: dict) -> st.SearchStrategy[str]:
    """Values (as YAML text) that break the type or the bounds."""
    bad = [st.sampled_from([".nan", ".inf", "-.inf", "abc", "[1, 2]", "{a: 1}", "true"])]
    if kind is int:
        bad.append(st.floats(0.1, 0.9).map(lambda x: f"{x + 3:.2f}"))  # not an integer
    for k, b in bounds.items():
        side = -1 if k in ("ge", "gt") else 1  # below a lower bound, above an upper one
        bad.append(st.floats(0, 1e6).map(lambda x, b=b, side=side: repr(kind(b + side * (x + (kind is int))))))
    return st.one_of(*bad).filter(lambda v: not _valid(v, kind, bounds))


def _valid(text: str, kind: type, bounds: dict) -> bool:
    """Whether ``text`` happens to be a valid value after all (a float draw can land on a bound)."""
    try:
        v = float(text)
    except ValueError:
        return False
    if not math.isfinite(v) or (kind is int and v != int(v)):
        return False
    return all({"ge": v >= b, "gt": v > b, "le": v <= b, "lt": v < b}[k] for k, b in bounds.items())


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "masked"
    shutil.copytree(LEGACY / "masked", d)
    return d


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_invalid_config_values_are_one_line_errors(data, run_folder, capsys):
    key, kind, bounds, family = data.draw(st.sampled_from(KEYS))
    value = data.draw(invalid(kind, bounds))
    before = snapshot(run_folder)
    if family is None:
        sets = ["--set", f"{key}={value}"]
    else:  # the whole process section, so the key belongs to its family
        sets = ["--set", f"process={{type: {family}, {key.split('.', 1)[1]}: {value}}}"]
    code = main(["train", str(run_folder), "--resume", "--no-progress", *sets])
    err = capsys.readouterr().err
    assert code == 2 and one_line_error(err), (key, value, err)
    assert key in err or key.split(".", 1)[1] in err, (key, value, err)
    assert snapshot(run_folder) == before


CLI_OPTIONS = {
    "sample": {"--num": (int, {"ge": 1}), "--length": (int, {"ge": 1}), "--batch-size": (int, {"ge": 1}),
               "--steps": (int, {"ge": 1}), "--seed": (int, {"ge": 0}), "--temperature": (float, {"gt": 0}),
               "--top-p": (float, {"gt": 0, "le": 1})},
    "eval": {"--samples": (int, {"ge": 1}), "--batch-size": (int, {"ge": 1}), "--max-batches": (int, {"ge": 1}),
             "--seed": (int, {"ge": 0})},
    "infill": {"--span-tokens": (int, {"ge": 1}), "--num": (int, {"ge": 1})},
    "bench-sampling": {"--num": (int, {"ge": 1}), "--length": (int, {"ge": 1})},
}
# the samplers' own numeric options, with the bounds they declare (checked when the sampler is built)
SAMPLER_OPTIONS = [(c.name, registry.option_flag(f), kind, b) for c in registry.samplers("masked")
                   for (name, kind, b) in _numeric(c.Options, "") for f in dataclasses.fields(c.Options)
                   if f.name == name and b]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_invalid_cli_options_are_one_line_errors(data, run_folder, capsys):
    if data.draw(st.booleans()) and SAMPLER_OPTIONS:
        sampler, flag, kind, bounds = data.draw(st.sampled_from(SAMPLER_OPTIONS))
        args = ["sample", str(run_folder), "--sampler", sampler, flag, data.draw(invalid(kind, bounds)), "--steps", "2"]
    else:
        cmd = data.draw(st.sampled_from(sorted(CLI_OPTIONS)))
        flag = data.draw(st.sampled_from(sorted(CLI_OPTIONS[cmd])))
        kind, bounds = CLI_OPTIONS[cmd][flag]
        value = data.draw(invalid(kind, bounds))
        args = [cmd, str(run_folder), *(["the [MASK] sat"] if cmd == "infill" else []), f"{flag}={value}"]
    before = snapshot(run_folder)
    try:
        code = main(args)
    except SystemExit as e:  # argparse's exit, through difflm's one-line error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and one_line_error(err), (args, err)
    assert snapshot(run_folder) == before


def test_the_covered_keys_include_every_section():
    sections = {k.split(".")[0] for k, *_ in KEYS}
    assert sections == {"data", "tokenizer", "train", "sample", "model", "process"}
    assert {f for *_, f in KEYS} >= set(registry.families()) - {"autoregressive", "uniform", "sedd", "editflow"}
    assert SAMPLER_OPTIONS  # remdm's eta, confidence's block, ...
