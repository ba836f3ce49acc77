"""A run folder that a kill cannot break.

Every file of a run is written atomically (``io.atomic_replace``). A save writes, in this order:
checkpoint.safetensors (model, EMA, optimizer, RNG, step) → tokenizer.json, model.safetensors, config.json
(the model folder, EMA weights) → manifest.json, which names the step and the SHA-256 of each of those files
and is written last. So at any moment either the manifest describes the files on disk, or a save was cut
short after the checkpoint — and ``--resume`` (or ``difflm export RUN``) rebuilds the model folder from the
checkpoint. Readers (``from_pretrained``, ``sample``, ``eval``) check the model files against the manifest
and say exactly which file is inconsistent and the one command that repairs it.

One writer at a time: ``RunLock`` holds ``.lock`` (the owner's pid and host); a lock whose process is gone is
stale and replaced, a live one is a one-line error. Temp files of killed writes are removed by the next writer.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from .errors import DiffLMError
from .io import atomic_write_text, sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "difflm-manifest-1"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.csv"
CHANGES = "changes.jsonl"
LOCK = ".lock"
MODEL_FILES = ("tokenizer.json", "model.safetensors", "config.json")
#: everything a training run writes (what --overwrite clears)
RUN_FILES = (CHECKPOINT, *MODEL_FILES, MANIFEST, METRICS, CHANGES)

#: config keys that may differ when resuming: how long to train and how to log, not what is trained
RESUMABLE_CHANGES = ("name", "train.max_steps", "train.max_minutes", "train.log_every", "train.eval_every",
                     "train.eval_batches", "train.save_every", "train.tensorboard", "train.threads", "data.cache_dir",
                     "sample.")


# -- manifest -----------------------------------------------------------------------------------------
def write_manifest(run_dir: Path, step: int | None, files: tuple[str, ...]) -> None:
    """Record ``step`` and the checksum of each of ``files`` (those present) — written last, atomically."""
    run_dir = Path(run_dir)
    entries = {f: {"sha256": sha256_file(run_dir / f), "bytes": (run_dir / f).stat().st_size}
               for f in files if (run_dir / f).is_file()}
    atomic_write_text(run_dir / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": entries},
                                                     indent=1))


def read_manifest(run_dir: Path) -> dict | None:
    """The manifest, or None for a folder written before manifests (or by hand)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        m = None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("files"), dict):
        raise DiffLMError(f"{path} is corrupted; rebuild it from the checkpoint with: difflm export {run_dir}")
    return m


def inconsistent_files(run_dir: Path, manifest: dict, files: tuple[str, ...] = MODEL_FILES) -> list[str]:
    """Which of ``files`` differ from (or are missing against) the manifest."""
    bad = []
    for f in files:
        want = manifest["files"].get(f)
        path = Path(run_dir) / f
        if want is None:
            continue
        if not path.is_file() or path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
            bad.append(f)
    return bad


def check_model_folder(run_dir: Path) -> None:
    """A one-line error when the model files are not the ones the manifest names (a save was interrupted
    after the checkpoint was written): the recovery is to re-export them from the checkpoint."""
    m = read_manifest(run_dir)
    if m is None:
        return
    bad = inconsistent_files(run_dir, m)
    if bad:
        owner = lock_owner(Path(run_dir) / LOCK)
        if owner is not None and owner.get("host") == socket.gethostname() and _alive(int(owner.get("pid", -1))):
            raise DiffLMError(f"{run_dir} is being saved by a running training (pid {owner['pid']}); "
                              "try again in a moment")
        fix = (f"difflm export {run_dir}" if (Path(run_dir) / CHECKPOINT).is_file()
               else "put back the files saved with it")
        what = f"{' and '.join(bad)} {'differs' if len(bad) == 1 else 'differ'}"
        raise DiffLMError(f"{run_dir}: {what} from what the run's manifest recorded (step {m.get('step')}): a save "
                          f"cut short or a file replaced by hand; rewrite the model folder with: {fix}")


def copy_model_folder(run_dir: Path, dest: Path) -> None:
    """Copy the model of ``run_dir`` as it stands (the model files and the manifest) to ``dest``, whole or not at
    all: written beside it and renamed into place, after checking the copy against the manifest (a snapshot of a
    run that goes on training, e.g. the AR model an adaptation starts from)."""
    run_dir, dest = Path(run_dir), Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in (*MODEL_FILES, MANIFEST):
        shutil.copy2(run_dir / f, tmp / f)
    check_model_folder(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


# -- one writer ---------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_owner(path: Path) -> dict | None:
    """{"pid", "host"} of a lock file, or None when there is none or it is unreadable (a kill while it was
    written: stale)."""
    try:
        owner = json.loads(Path(path).read_text())
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


class RunLock:
    """``with RunLock(run_dir):`` — this process is the run folder's only writer until the block ends."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.held = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock_owner(self.path)
                if owner is not None and owner.get("host") != me["host"]:
                    raise DiffLMError(
                        f"{self.path.parent} is locked by pid {owner.get('pid')} on {owner.get('host')}; if no "
                        f"difflm runs there, remove {self.path}") from None
                if owner is not None and owner.get("pid") != me["pid"] and _alive(int(owner.get("pid", -1))):
                    raise DiffLMError(
                        f"another difflm process (pid {owner['pid']}) is writing {self.path.parent}; wait for it "
                        "to finish or stop it, or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise DiffLMError(f"cannot take the lock {self.path}; remove it if no difflm process uses the folder")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files that killed writes left (``.NAME.tmpPID``); call while holding the lock."""
    gone = []
    for p in Path(run_dir).glob(".*.tmp*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def clear_run(run_dir: Path) -> None:
    """Remove what a training run wrote (--overwrite, or a fresh start after a run killed before its first
    checkpoint): checkpoint, model folder files, manifest, logs."""
    import shutil

    run_dir = Path(run_dir)
    for f in RUN_FILES:
        (run_dir / f).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)


# -- resuming with a changed config -------------------------------------------------------------------
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("data", "tokenizer", "model", "process", "train", "sample") and not prefix:
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(saved: dict, new: dict) -> dict[str, tuple]:
    """Dotted keys whose values differ between two ``RunConfig.to_dict()``s: {key: (saved, new)}."""
    a, b = _flat(saved), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def refused_changes(changes: dict[str, tuple], allowed: list[str]) -> dict[str, tuple]:
    """The changes neither resumable by nature (``RESUMABLE_CHANGES``) nor allowed by the user."""
    ok = [*RESUMABLE_CHANGES, *allowed]
    return {k: v for k, v in changes.items()
            if not any(k == p or (p.endswith(".") and k.startswith(p)) or k.startswith(p + ".") for p in ok)}


def record_changes(run_dir: Path, step: int, changes: dict[str, tuple]) -> None:
    """Append the accepted non-resumable changes to changes.jsonl (atomic rewrite)."""
    path = Path(run_dir) / CHANGES
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    line = json.dumps({"step": step, "changes": {k: {"was": a, "now": b} for k, (a, b) in changes.items()}})
    atomic_write_text(path, old + line + "\n")


def describe(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} ({a!r} → {b!r})" for k, (a, b) in changes.items())

