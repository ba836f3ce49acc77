"""``difflm convert --from mdlm|bd3lm|duo|sedd SRC OUT``: a published diffusion checkpoint as a difflm model folder.

``--from llada|dream`` instead writes a folder that *wraps* a Hugging Face masked diffusion model (``models/hf.py``):
its config names the model, whose weights stay where they are.

The four DiT formats share one network, the DiT of ``models/dit.py``; they differ in key prefixes, config fields and the
family their math belongs to:

==========  ==========================================  =================================================
--from      checkpoint (SRC)                            difflm process
==========  ==========================================  =================================================
mdlm        Hub folder (config.json + model.safetensors,  masked, log-linear noise, time-free unless
            keys ``backbone.*``) or Lightning ``.ckpt``   the config sets time_conditioning
bd3lm       as mdlm, plus ``block_size``                  block (block_size from the config), time-free
sedd        ``SEDD.from_pretrained`` folder (unprefixed    sedd (absorb or uniform graph), σ-conditioned,
            keys, config {tokens, graph, noise, model})   scale_by_sigma
duo         as mdlm (no [MASK] row: uniform state)         uniform, time-conditioned on σ = −log α (read from
                                                          DUO's code; no reference fixture checks it)
==========  ==========================================  =================================================

The references append their [MASK] (absorbing state) after the tokenizer's vocabulary (GPT-2: 50257 → id 50257);
difflm's other special tokens ([PAD], [BOS]) come after it, with the mean embedding and an output row that is
never predicted, and the tokenizer's own end of text (``--eos-token``, GPT-2's ``<|endoftext|>``) serves as
[EOS]. EMA weights are used when the checkpoint has them (the references evaluate with them). Pickled checkpoints
(``.ckpt``, ``.pth``, ``.bin``) are read with ``torch.load(weights_only=True)``: tensors only, no code runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import DiffLMError

FORMATS = ("mdlm", "bd3lm", "duo", "sedd")
#: Hugging Face masked diffusion models wrapped, not converted (models/hf.py): their mask token and shift
WRAPPED = {"llada": {"mask_token": "<|mdm_mask|>", "shift": False}, "dream": {"mask_token": "<|mask|>", "shift": True}}
PREFIXES = ("_orig_mod.", "backbone.", "model.", "module.")
GPT2_EOS = "<|endoftext|>"

#: reference DiT key (regex) -> difflm ``dit`` backbone key
DIT_KEYS = [
    (r"vocab_embed\.embedding", "embed.weight"),
    (r"sigma_map\.mlp\.(0|2)\.(weight|bias)", r"sigma_mlp.\1.\2"),
    (r"blocks\.(\d+)\.norm(1|2)\.weight", r"blocks.\1.norm\2.weight"),
    (r"blocks\.(\d+)\.attn_qkv\.weight", r"blocks.\1.qkv.weight"),
    (r"blocks\.(\d+)\.attn_out\.weight", r"blocks.\1.attn_out.weight"),
    (r"blocks\.(\d+)\.mlp\.(0|2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"blocks\.(\d+)\.adaLN_modulation\.(weight|bias)", r"blocks.\1.ada.\2"),
    (r"output_layer\.norm_final\.weight", "norm_f.weight"),
    (r"output_layer\.adaLN_modulation\.(weight|bias)", r"ada_f.\1"),
    (r"output_layer\.linear\.(weight|bias)", r"head.\1"),
]
IGNORED = (r"rotary_emb\.inv_freq", r"sampling_eps_(min|max)")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DiffLMError(f"cannot read {path} as a weights-only PyTorch checkpoint ({str(e).splitlines()[0][:120]})"
                          "; export its state dict to model.safetensors first") from None


def read_checkpoint(src: str | Path, config: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The reference state dict (prefixes stripped, EMA weights when present) and its config dict, from a folder
    (config.json + model.safetensors / pytorch_model.bin) or a checkpoint file (``config``: its config, JSON)."""
    from .io import read_json, read_safetensors

    src = Path(src).expanduser()
    if not src.exists():
        raise DiffLMError(f"checkpoint {src} not found: give the downloaded folder or checkpoint file")
    cfg_path = Path(config) if config else (src / "config.json" if src.is_dir() else None)
    if cfg_path is None or not cfg_path.is_file():
        raise DiffLMError(f"no config for {src}: a checkpoint folder holds config.json; for a single file pass "
                          "--config with the run's config (JSON)")
    cfg = read_json(cfg_path)
    ema = None
    if src.is_dir():
        files = [src / "model.safetensors", src / "pytorch_model.bin"]
        found = next((f for f in files if f.is_file()), None)
        if found is None:
            raise DiffLMError(f"{src} holds neither model.safetensors nor pytorch_model.bin")
        state = read_safetensors(found)[0] if found.suffix == ".safetensors" else _torch_load(found)
    elif src.suffix == ".safetensors":
        state = read_safetensors(src)[0]
    else:
        obj = _torch_load(src)
        state = obj.get("state_dict") or obj.get("model") or obj
        ema = (obj.get("ema") or {}).get("shadow_params") if isinstance(obj.get("ema"), dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DiffLMError(f"{src} holds no state dict of tensors")
    state = {_strip(k): v for k, v in state.items()}
    if ema:  # shadow params: the trainable backbone parameters in state-dict order (buffers excluded)
        trainable = [k for k in state if not any(re.fullmatch(p, k) for p in IGNORED)]
        if len(trainable) != len(ema):
            raise DiffLMError(f"{src}: {len(ema)} EMA tensors for {len(trainable)} parameters")
        state.update(zip(trainable, ema))
    return state, cfg


def _get(cfg: dict, *paths: str, default=None):
    for p in paths:
        node = cfg
        for part in p.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return default


def architecture(cfg: dict, state: dict[str, torch.Tensor]) -> dict:
    """``DiTConfig`` fields from any of the references' configs (Hub wrapper, SEDD mixin, Hydra run config),
    checked against the tensors."""
    d = _get(cfg, "hidden_dim", "hidden_size", "model.hidden_size")
    n_head = _get(cfg, "n_heads", "model.n_heads")
    cond = _get(cfg, "cond_dim", "model.cond_dim")
    if d is None or n_head is None or cond is None:
        raise DiffLMError("the checkpoint's config names no hidden size, heads or cond_dim: is it an MDLM, BD3-LM, "
                          "DUO or SEDD config?")
    n_layer = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    emb = state.get("vocab_embed.embedding")
    if emb is None or emb.shape[1] != d:
        raise DiffLMError("the checkpoint has no vocab_embed.embedding of the configured width: not a DiT checkpoint "
                          "of MDLM, BD3-LM, DUO or SEDD")
    inv = state.get("rotary_emb.inv_freq")
    dh = d // n_head
    if inv is not None and not torch.allclose(inv.float(), 1.0 / 10000 ** (torch.arange(0, dh, 2).float() / dh)):
        raise DiffLMError("the checkpoint's rotary frequencies are not θ = 10000 over the head dimension")
    mlp = state["blocks.0.mlp.0.weight"].shape[0] // d
    return {"n_layer": n_layer, "n_head": int(n_head), "d_model": int(d), "d_cond": int(cond), "mlp_ratio": mlp,
            "vocab": int(emb.shape[0]), "length": int(_get(cfg, "model_length", "model.length", default=1024))}


def process_config(kind: str, cfg: dict) -> dict:
    """The difflm ``process`` section for a reference checkpoint of ``kind``. All four use the log-linear noise
    (difflm's α(t) = 1 − t reaches 0 at t = 1; the references stop at α = ε: the same noise levels, see dit.py)."""
    if kind == "sedd":
        noise = _get(cfg, "noise.type", default="loglinear")
        if noise != "loglinear":
            raise DiffLMError(f"SEDD noise {noise!r} is not supported; the published SEDD models use loglinear")
        return {"type": "sedd", "graph": _get(cfg, "graph.type", default="absorb"), "schedule": "loglinear",
                "time_conditioning": True, "scale_by_sigma": bool(_get(cfg, "model.scale_by_sigma", default=True))}
    tc = bool(_get(cfg, "time_conditioning", "algo.time_conditioning", default=False))
    if kind == "mdlm":
        return {"type": "masked", "schedule": "loglinear", "time_conditioning": tc}
    if kind == "bd3lm":
        if tc:
            raise DiffLMError("this BD3-LM checkpoint is time-conditioned; difflm's block family is time-free")
        return {"type": "block", "block_size": int(_get(cfg, "block_size", "model.block_size", default=4)),
                "schedule": "loglinear"}
    if kind == "duo":
        return {"type": "uniform", "schedule": "loglinear", "time_conditioning": True}
    raise DiffLMError(f"--from must be one of {', '.join(FORMATS)}")


def build_tokenizer(spec: str | None, src: Path, ckpt_vocab: int, eos_token: str | None, absorbing: bool = True):
    """The checkpoint's tokenizer with [MASK] at the reference's id (its last row; ``absorbing``) and difflm's other
    specials after it. A uniform-state checkpoint (DUO) has no [MASK] row: difflm's is added like the others."""
    from tokenizers import Tokenizer as HFTokenizer

    from .data.tokenizers import SPECIALS, Tokenizer

    where = spec or (str(src / "tokenizer.json") if src.is_dir() and (src / "tokenizer.json").is_file() else "gpt2")
    try:
        hf = HFTokenizer.from_file(where) if Path(where).is_file() else HFTokenizer.from_pretrained(where)
    except Exception as e:
        raise DiffLMError(f"cannot load the tokenizer {where!r} ({str(e).splitlines()[0][:100]}); pass --tokenizer "
                          "with a tokenizer.json (GPT-2's for MDLM, BD3-LM, DUO and SEDD)") from None
    base = hf.get_vocab_size(with_added_tokens=True)
    if base + absorbing != ckpt_vocab:
        raise DiffLMError(f"the tokenizer has {base} tokens but the checkpoint's embedding has {ckpt_vocab} rows "
                          f"(the vocabulary{' + [MASK]' if absorbing else ''}): pass the tokenizer the model was "
                          "trained with")
    if absorbing:
        hf.add_special_tokens([SPECIALS["mask"]])
    if eos_token is None and hf.token_to_id(GPT2_EOS) is not None:
        eos_token = GPT2_EOS
    return Tokenizer(hf, "hf", eos_token=eos_token)


def convert(kind: str, src: str | Path, out: str | Path, *, tokenizer: str | None = None,
            config: str | Path | None = None, eos_token: str | None = None) -> Path:
    """Write a difflm model folder at ``out`` from a reference checkpoint; returns ``out``."""
    from .components import build_components, write_model_folder
    from .config import RunConfig
    from .models.weights import grow_rows, rename

    if kind not in FORMATS:
        raise DiffLMError(f"--from must be one of {', '.join(FORMATS)}")
    src, out = Path(src).expanduser(), Path(out)
    state, cfg = read_checkpoint(src, config)
    arch = architecture(cfg, state)
    proc = process_config(kind, cfg)
    absorbing = proc["type"] in ("masked", "block") or proc.get("graph") == "absorb"
    tok = build_tokenizer(tokenizer, src, arch["vocab"], eos_token, absorbing)
    model_cfg = {"type": "dit", **{k: arch[k] for k in ("n_layer", "n_head", "d_model", "d_cond", "mlp_ratio")}}
    model_cfg["sigma_eps"] = float(_get(cfg, "noise.eps", "sampling_eps_min", default=1e-3))
    run = RunConfig.from_dict({"name": f"{kind}-{src.stem}", "model": model_cfg, "process": proc,
                               "data": {"corpus": "ptb", "mode": "packed", "seq_len": arch["length"]},
                               "tokenizer": {"type": "hf"}, "sample": {"steps": 128}})
    model, _ = build_components(run, tok)
    ours = rename(state, DIT_KEYS)
    unknown = [k for k in state if not any(re.fullmatch(p, k) for p, _ in DIT_KEYS + [(i, "") for i in IGNORED])]
    if unknown:
        raise DiffLMError(f"{src} has tensors a {kind} DiT does not ({', '.join(unknown[:3])}): another architecture?")
    V = tok.vocab_size
    with torch.no_grad():
        ours["embed.weight"] = grow_rows(ours["embed.weight"], V)
        ours["head.weight"] = grow_rows(ours["head.weight"], V, 0.0)
        # the added ids ([PAD], [BOS]; DUO's [MASK]) are never data: an output the model never learned gets no mass
        ours["head.bias"] = grow_rows(ours["head.bias"], V, -1e4)
    try:
        model.load_state_dict({k: v.float() for k, v in ours.items()})
    except RuntimeError as e:
        raise DiffLMError(f"{src} does not fit the DiT its config describes ({str(e).splitlines()[0][:160]})") \
            from None
    write_model_folder(out, model.eval(), tok, run, None)
    (out / "converted_from.json").write_text(json.dumps({"from": kind, "source": str(src), "mask_id": tok.mask_id},
                                                        indent=2))
    return out


def wrap(kind: str, src: str, out: str | Path, *, tokenizer: str | None = None, mask_token: str | None = None,
         eos_token: str | None = None, shift: bool | None = None, attention: str = "native", family: str = "masked",
         block_size: int = 4, seq_len: int = 256) -> Path:
    """Write a model folder at ``out`` that runs the LLaDA- or Dream-style model ``src`` (folder or hub name)."""
    from tokenizers import Tokenizer as HFTokenizer

    from .components import build_components, write_model_folder
    from .config import RunConfig
    from .data.tokenizers import Tokenizer

    if kind not in WRAPPED:
        raise DiffLMError(f"--from must be one of {', '.join([*FORMATS, *WRAPPED])}")
    spec = WRAPPED[kind]
    mask_token = mask_token or spec["mask_token"]
    shift = spec["shift"] if shift is None else shift
    local = Path(src).expanduser()
    where = str(local.resolve()) if local.exists() else src
    if tokenizer:
        try:
            hf_tok = HFTokenizer.from_file(tokenizer)
        except Exception as e:
            raise DiffLMError(f"cannot read the tokenizer {tokenizer}: {str(e).splitlines()[0][:100]}") from None
        eos = None
    else:
        import transformers

        try:
            t = transformers.AutoTokenizer.from_pretrained(where, trust_remote_code=True)
        except (OSError, ValueError, KeyError) as e:
            raise DiffLMError(f"cannot load the tokenizer of {src!r}: {str(e).splitlines()[0][:120]}; pass "
                              "--tokenizer") from None
        hf_tok, eos = t.backend_tokenizer, t.eos_token
    tok = Tokenizer(hf_tok, "hf", mask_token=mask_token, eos_token=eos_token or eos)
    process = {"type": family, "time_conditioning": False}
    if family == "block":
        process["block_size"] = block_size
    elif family != "masked":
        raise DiffLMError("a wrapped model is a masked denoiser: --family masked or block")
    run = RunConfig.from_dict({"name": f"{kind}-{Path(str(src)).name}",
                               "model": {"type": "hf", "path": where, "shift": shift, "attention": attention},
                               "process": process, "data": {"corpus": "ptb", "mode": "packed", "seq_len": seq_len},
                               "tokenizer": {"type": "hf"}, "sample": {"steps": 128}})
    model, _ = build_components(run, tok)
    write_model_folder(Path(out), model.eval(), tok, run, None)
    (Path(out) / "converted_from.json").write_text(json.dumps({"from": kind, "source": where, "wrapped": True},
                                                              indent=2))
    return Path(out)
