"""A run's parts and its model folder: the process and backbone a config describes, and the folder that
holds them (config.json, model.safetensors, tokenizer.json). Shared by the trainer (which writes the folder)
and ``DiffusionLM`` (which reads it); it knows no family by name: the registries do."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import __version__, registry, runfolder
from .config import RunConfig
from .data.tokenizers import Tokenizer
from .diffusion import Process, build_process
from .errors import DiffLMError
from .io import atomic_save_safetensors, atomic_write_text, read_json, read_safetensors

MODEL_FORMAT = "difflm-model-1"


def build_components(run: RunConfig, tokenizer: Tokenizer, length_prior=None,
                     backbone: dict | None = None) -> tuple[nn.Module, Process]:
    """The backbone and process a run config describes, for this tokenizer: the backbone's config
    (``model.type``) with what the family needs filled in (``Process.backbone_needs``) — or, from a model
    folder, the backbone config it recorded (``backbone``: its type and every field; no pretrained checkpoint
    is read again)."""
    starts = tokenizer.word_starts() if getattr(run.process, "align", None) in ("words", "whole-words") else ()
    never = tokenizer.unreachable_ids() if run.tokenizer.exclude_unreachable else ()
    process = build_process(run.process, vocab_size=tokenizer.vocab_size, special=tokenizer.special,
                            length_prior=length_prior, word_starts=starts, never=never)
    try:
        if backbone is not None:
            fields = dict(backbone)
            if fields.get("absolute_positions") and "absolute_scale" not in fields:
                fields["absolute_scale"] = 1.0  # folders written before the option: the sinusoid they were trained on
            cls = registry.backbone(fields.pop("type"))
            model = cls(cls.Config(**fields))
        else:
            cfg = run.model.with_needs(process.backbone_needs(), tokenizer.vocab_size, run.data.seq_len)
            if run.data.target_length == "predicted":
                if not getattr(cfg, "encoder_layers", 0):
                    raise DiffLMError("data.target_length predicted needs an encoder-decoder to predict the length "
                                      "from: set model.encoder_layers (e.g. 3)")
                cfg = replace(cfg, length_classes=run.data.seq_len + 1)
            if run.data.corpus == "scenes":
                if not getattr(cfg, "encoder_layers", 0) or not hasattr(cfg, "image_size"):
                    raise DiffLMError("captioning reads the image through an encoder: use model.type transformer with "
                                      "model.encoder_layers (e.g. 2)")
                from .data.scenes import CANVAS

                cfg = replace(cfg, image_size=CANVAS)
            model = registry.backbone(registry.backbone_kind(run.model))(cfg)
    except (ValueError, TypeError) as e:
        raise DiffLMError(f"bad model config: {e}") from None
    if getattr(process.options, "clean_targets", False) and not getattr(model.cfg, "shift", False):
        raise DiffLMError("process.clean_targets needs model.shift: true (a position's prediction read off the state "
                          "before it, which clean-causal attention keeps from reading that position)")
    if getattr(model.cfg, "encoder_layers", 0):
        if run.data.mode != "pairs":
            raise DiffLMError("model.encoder_layers reads a seq2seq source: it needs data.corpus pairs")
        if process.family not in ENCODER_FAMILIES:
            raise DiffLMError(f"model.encoder_layers is not supported by the {process.family} family yet (it is by "
                              f"{', '.join(ENCODER_FAMILIES)}): set model.encoder_layers: 0")
    return model, process


# families whose networks an encoder-decoder backbone serves (block diffusion's own masks and positions compose with
# the decoder's view of the target; DiffusER's tagger and generator read x_t from position 0; Edit Flows not yet)
ENCODER_FAMILIES = ("masked", "block", "uniform", "sedd", "d3pm", "gaussian", "autoregressive", "edit")


def check_pretrained_tokenizer(run: RunConfig) -> None:
    """A run that starts from pretrained weights (``model.init``) must read text with that checkpoint's own
    tokenizer: token ids index its embedding rows, so another tokenizer would silently mean other words."""
    init = getattr(run.model, "init", None)
    if not init:
        return
    from .hub import resolve

    tok = run.tokenizer
    if tok.type != "hf" or not tok.path or resolve(tok.path).resolve() != resolve(init).resolve():
        raise DiffLMError(f"model.init {init} needs the checkpoint's own tokenizer: set tokenizer: "
                          f"{{type: hf, path: {init}}}")


def folder_config(run: RunConfig, tokenizer: Tokenizer, length_prior: list[float] | None,
                  model: nn.Module | None = None) -> dict:
    """What config.json holds: the run config, the tokenizer facts a reader checks, and the backbone's whole
    config as built (``backbone``) so that a reader rebuilds exactly that network."""
    out = {"difflm_version": __version__, "run": run.to_dict(), "vocab_size": tokenizer.vocab_size,
           "special": tokenizer.special, "tokenizer_kind": tokenizer.kind, "length_prior": length_prior}
    if model is not None:
        out["backbone"] = {"type": registry.backbone_kind(model.cfg), **dataclasses.asdict(model.cfg)}
    return out


def write_model_folder(path: Path, model: nn.Module, tokenizer: Tokenizer, run: RunConfig,
                       length_prior: list[float] | None, step: int | None = None,
                       manifest_files: tuple[str, ...] = runfolder.MODEL_FILES) -> None:
    """Write a model folder — tokenizer.json, model.safetensors (the weights as they are), config.json, each
    atomically — and then the manifest naming ``step`` and the checksums of ``manifest_files``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path / "tokenizer.json")
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save_safetensors(weights, path / "model.safetensors", {"format": MODEL_FORMAT})
    atomic_write_text(path / "config.json", json.dumps(folder_config(run, tokenizer, length_prior, model), indent=2))
    runfolder.write_manifest(path, step, manifest_files)


def read_folder_tokenizer(path: Path, cfg: dict, run: RunConfig) -> Tokenizer:
    """The tokenizer.json of a model or run folder, with the special ids its config.json (``cfg``) recorded and the
    run's ``tokenizer.unk_text``."""
    return Tokenizer.load(path / "tokenizer.json", cfg.get("tokenizer_kind", "hf"), cfg.get("special"),
                          unk_text=run.tokenizer.unk_text)


def read_model_folder(path: Path) -> tuple[nn.Module, Process, Tokenizer, RunConfig, list[float] | None]:
    """Rebuild (model, process, tokenizer, run, length_prior) from a model folder, with one-line errors for
    a missing, mismatched or corrupted part."""
    path = Path(path)
    if not path.is_dir():
        raise DiffLMError(f"model folder {path} does not exist")
    if not (path / "model.safetensors").is_file():
        raise DiffLMError(
            f"{path} has no model.safetensors: training has not saved a model there yet, "
            "or the folder is incomplete"
        )
    runfolder.check_model_folder(path)
    cfg = read_json(path / "config.json")
    if not isinstance(cfg, dict) or "run" not in cfg:
        raise DiffLMError(f"{path / 'config.json'} is not a difflm model config")
    run = RunConfig.from_saved(cfg["run"])
    tokenizer = read_folder_tokenizer(path, cfg, run)
    if tokenizer.vocab_size != cfg.get("vocab_size") or tokenizer.special != cfg.get("special"):
        raise DiffLMError(
            f"{path / 'tokenizer.json'} does not match the model (vocabulary {tokenizer.vocab_size} vs "
            f"{cfg.get('vocab_size')}); put back the tokenizer the model was trained with"
        )
    length_prior = cfg.get("length_prior")
    model, process = build_components(run, tokenizer, length_prior, cfg.get("backbone"))
    weights, _ = read_safetensors(path / "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise DiffLMError(f"{path / 'model.safetensors'} does not fit config.json ({str(e).splitlines()[0]})") from None
    return model, process, tokenizer, run, length_prior


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
