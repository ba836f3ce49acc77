"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else as JSON in its metadata.

A checkpoint holds model, EMA, optimizer state, the step and the RNG state, so that ``--resume``
continues exactly. Files are written to a temporary name, fsynced, then renamed over the old one, so a
kill at any moment leaves either the old or the new checkpoint, never a broken one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DiffLMError
from ..io import atomic_save_safetensors, read_safetensors

FORMAT = "difflm-checkpoint-1"


def save_checkpoint(path: Path, model, ema, optimizer, state: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.cpu() for k, v in ema.shadow.items()})
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optim.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format": FORMAT, "state": json.dumps(state), "param_groups": json.dumps(opt["param_groups"])}
    atomic_save_safetensors(tensors, path, meta)


def load_checkpoint(path: Path, model, ema, optimizer) -> dict:
    """Restore model, EMA, optimizer and RNG from ``path``; returns the saved training state."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise DiffLMError(f"{path} is not a difflm training checkpoint (format {meta.get('format')!r})")
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for k in ema.shadow:
            ema.shadow[k].copy_(tensors[f"ema.{k}"])
        state: dict = {}
        for key, v in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        torch.set_rng_state(tensors["rng.torch"])
        return json.loads(meta["state"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise DiffLMError(
            f"{path} does not match this run's model ({str(e).splitlines()[0]}); "
            "was the config changed since it was written?"
        ) from None


def export_from_checkpoint(run_dir: Path) -> int:
    """Rewrite a run's model folder (tokenizer.json, model.safetensors with the EMA weights, config.json) and
    its manifest from checkpoint.safetensors: what repairs a save cut short after the checkpoint was written.
    Returns the checkpoint's step."""
    from ..components import build_components, read_folder_tokenizer, write_model_folder
    from ..config import RunConfig
    from ..io import read_json
    from ..runfolder import CHECKPOINT, MODEL_FILES

    run_dir = Path(run_dir)
    tensors, meta = read_safetensors(run_dir / CHECKPOINT)
    if meta.get("format") != FORMAT:
        raise DiffLMError(f"{run_dir / CHECKPOINT} is not a difflm training checkpoint")
    cfg = read_json(run_dir / "config.json")
    if not isinstance(cfg, dict) or "run" not in cfg:
        raise DiffLMError(f"{run_dir / 'config.json'} is not a difflm run config; the run cannot be exported")
    run = RunConfig.from_saved(cfg["run"])
    tok = read_folder_tokenizer(run_dir, cfg, run)
    model, _ = build_components(run, tok, cfg.get("length_prior"), cfg.get("backbone"))
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        with torch.no_grad():  # the model folder holds the EMA weights
            for k, p in model.named_parameters():
                p.copy_(tensors[f"ema.{k}"])
    except (KeyError, RuntimeError) as e:
        raise DiffLMError(f"{run_dir / CHECKPOINT} does not match {run_dir / 'config.json'} "
                          f"({str(e).splitlines()[0]})") from None
    step = json.loads(meta["state"])["step"]
    write_model_folder(run_dir, model, tok, run, cfg.get("length_prior"), step, (CHECKPOINT, *MODEL_FILES))
    return step
