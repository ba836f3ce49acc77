"""File helpers shared by every writer and reader of run folders: atomic writes (temp file, fsync, rename) and
checked reads that turn a missing or corrupted file into a one-line error."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DiffLMError

_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fault injection for the kill tests (tests/test_kill.py, benchmarks/kill_soak.py): with the environment
    variable DIFFLM_KILL_AT=NAME:N this process kills itself (SIGKILL) the N-th time it reaches point NAME, e.g.
    ``model.safetensors:rename`` (a file's temp copy is written and synced, not yet renamed) or
    ``model.safetensors:done``. Unset, it costs one dictionary lookup."""
    spec = os.environ.get("DIFFLM_KILL_AT")
    if not spec:
        return
    target, _, n = spec.rpartition(":")
    if target != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: a hidden name with the writer's pid."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync_dir(path: Path) -> None:
    try:  # make a rename itself durable
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_replace(tmp: Path, path: Path) -> None:
    """Sync the finished temp file, rename it over ``path`` and sync the folder: a kill at any moment leaves
    the old file or the new one, never a torn one."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    fault_point(f"{path.name}:rename")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    fault_point(f"{path.name}:done")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path = Path(path)
    tmp = temp_path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    atomic_replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temp_path(path)
    tmp.write_bytes(data)
    atomic_replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DiffLMError(f"{path} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DiffLMError(
            f"{path} is corrupted or not a safetensors file ({str(e).splitlines()[0]}); "
            "restore it from a backup or retrain"
        ) from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffLMError(f"{path} not found: is {path.parent} a difflm model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffLMError(f"{path} is corrupted ({e}); restore it or retrain") from None
