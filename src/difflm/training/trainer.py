"""The training loop, for any process and model: AdamW, warmup + cosine LR, clipping, accumulation, EMA,
bf16 autocast, periodic validation, CSV/TensorBoard logs, atomic checkpoints with exact resume, and
data parallelism under ``torchrun``. It holds no family-specific code."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import runfolder
from ..components import build_components, check_pretrained_tokenizer, folder_config, write_model_folder
from ..config import RunConfig
from ..data import TokenDataset, Tokenizer, build_dataset, build_tokenizer, load_lines
from ..data.datasets import drop_condition
from ..diffusion.base import Batch, low_discrepancy_uniform
from ..errors import DiffLMError
from ..evaluation.likelihood import evaluate
from ..io import atomic_write_text, fault_point, read_json
from ..models.seq2seq import SourceReader, bind_source, length_terms, scene_terms
from ..precision import autocast
from ..rng import uniform
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from .ema import EMA

CKPT = runfolder.CHECKPOINT
METRICS = runfolder.METRICS
FIELDS = ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "val_nelbo", "elapsed_s"]


def lr_at(step: int, cfg, elapsed_s: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr·min_lr_ratio at max_steps, or, with
    cfg.decay_minutes, at that much training time (``elapsed_s`` seconds so far, the clock the ranks agree on)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_minutes is not None:
        frac = elapsed_s / (60 * cfg.decay_minutes)
    else:
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    tokens: int
    val_nelbo: float | None
    seconds: float


def check_unreachable_absent(tok: Tokenizer, splits: dict) -> None:
    """``tokenizer.exclude_unreachable`` gives those rows no mass, so a corpus that spells one out literally (a
    text holding "[CLS]") would cost infinite nats: a one-line error naming the token instead."""
    bad = np.array(sorted(tok.unreachable_ids()), dtype=np.int64)
    if not len(bad):
        return
    for split, ds in splits.items():
        rows = getattr(ds, "tokens", None)  # (N, L) token ids, usually a memory map: read in chunks
        if rows is None:
            continue
        for a in range(0, len(rows), 1 << 16):
            chunk = np.asarray(rows[a : a + (1 << 16)])
            hit = np.isin(chunk, bad)
            if hit.any():
                raise DiffLMError(f"the {split} text holds {tok.hf.id_to_token(int(chunk[hit][0]))!r}, a token that "
                                  "tokenizer.exclude_unreachable gives no mass: remove it from the corpus or set "
                                  "tokenizer.exclude_unreachable: false")


class Trainer:
    def __init__(self, run: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 overwrite: bool = False, allow_changes: list[str] | None = None) -> None:
        """``allow_changes``: config keys that may differ from the run's when resuming beyond those that
        always may (``runfolder.RESUMABLE_CHANGES``); they are recorded in the run's changes.jsonl."""
        self.run, self.out = run, Path(out_dir)
        self.resume, self.progress, self.overwrite = resume, progress, overwrite
        if self.out.exists() and not self.out.is_dir():
            raise DiffLMError(f"--out {self.out} is a file, not a folder; choose another --out")
        self.dist: DistInfo = init_distributed()
        t = run.train
        if t.threads:
            torch.set_num_threads(t.threads)
        per = t.batch_size / (self.dist.world * t.grad_accum)
        if per != int(per) or per < 1:
            raise DiffLMError(
                f"train.batch_size={t.batch_size} must be a multiple of world size × grad_accum "
                f"({self.dist.world} × {t.grad_accum})"
            )
        self.micro = int(per)
        ckpt = self.out / CKPT
        if resume and not ckpt.is_file():
            raise DiffLMError(f"--resume: {ckpt} not found; start without --resume to begin a new run")
        if not resume and not overwrite and (ckpt.exists() or (self.out / "model.safetensors").exists()):
            raise DiffLMError(
                f"{self.out} already holds a training run or model; pass --resume to continue it, --overwrite to "
                "start over there, or choose another --out"
            )
        self.changes: dict[str, tuple] = {}
        if resume:
            self.changes = self._check_changes(allow_changes or [])
        self.device = self.dist.device

    def _check_changes(self, allowed: list[str]) -> dict[str, tuple]:
        """The config differences from the run's own config.json that --resume accepts; anything else is a
        one-line error naming every differing key."""
        saved = read_json(self.out / "config.json")
        try:
            saved_run = RunConfig.from_saved(saved["run"]).to_dict()
        except (KeyError, TypeError):
            raise DiffLMError(f"{self.out / 'config.json'} is not a difflm run config; cannot resume") from None
        changes = runfolder.config_changes(saved_run, self.run.to_dict())
        refused = runfolder.refused_changes(changes, allowed)
        if refused:
            keys = ",".join(refused)
            raise DiffLMError(
                f"--resume: the config differs from the run's in {runfolder.describe(refused)}; resume with the run's "
                f"own config (difflm train {self.out} --resume) or accept the change with --allow-change {keys}")
        return runfolder.refused_changes(changes, [])  # the ones --allow-change accepted: recorded

    # -- set-up --------------------------------------------------------------------------------
    def _tokenizer(self) -> Tokenizer:
        path = self.out / "tokenizer.json"
        if self.resume:  # the ids the run folder recorded: a run trained before eos_token was honoured keeps its own
            recorded = self.out / "config.json"
            special = json.loads(recorded.read_text()).get("special") if recorded.is_file() else None
            return Tokenizer.load(path, self.run.tokenizer.type, special,
                                  eos_token=None if special else self.run.tokenizer.eos_token,
                                  unk_text=self.run.tokenizer.unk_text)
        if self.dist.is_main:
            tok = build_tokenizer(self.run.tokenizer, load_lines(self.run.data, "train"))
            # a fresh start: what an earlier attempt wrote here (--overwrite, or a run killed before its first
            # checkpoint) goes, logs included, so nothing of it mixes with this run
            runfolder.clear_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            tok.save(path)
        barrier(self.dist)
        return Tokenizer.load(path, self.run.tokenizer.type, eos_token=self.run.tokenizer.eos_token,
                              unk_text=self.run.tokenizer.unk_text)

    def _batch(self, data: TokenDataset, step: int, micro: int) -> Batch:
        """This rank's rows of micro-batch ``micro`` of global step ``step``: a pure function of the step,
        so resuming needs no data-loader state. Epoch e visits a fresh seeded permutation (on the scene stream,
        row r of the run is scene r)."""
        t = self.run.train
        slot = micro * self.dist.world + self.dist.rank
        rows = step * t.batch_size + slot * self.micro + torch.arange(self.micro)  # the rows' places in the run
        if getattr(data, "stream", None) is not None:  # data.scene_stream: row r of the run is a fresh scene r
            batch = data.drawn(rows)
        else:
            per_epoch = len(data) // t.batch_size
            if per_epoch == 0:
                raise DiffLMError(
                    f"the training set has {len(data)} sequences, fewer than train.batch_size={t.batch_size}"
                )
            epoch, j = divmod(step, per_epoch)
            perm = np.random.default_rng([t.seed, epoch]).permutation(len(data))
            start = j * t.batch_size + slot * self.micro
            batch = data.batch(perm[start : start + self.micro])
        # times stratified over the whole global batch (all ranks and micro-batches)
        u0 = float(uniform(t.seed, torch.tensor([step]), 0, 1, stream=3)[0, 0])
        batch.u = low_discrepancy_uniform(u0, self.micro, slot, self.dist.world * t.grad_accum)
        # corruption noise keyed on the row's place in the global batch: any world size and
        # accumulation split of the same global batch sees the same noise (and so the same gradient)
        batch.rows = rows
        batch.seed, batch.step = t.seed, step
        if t.cond_dropout > 0:
            if data.mode != "pairs":
                raise DiffLMError("train.cond_dropout drops a seq2seq source: it needs data.corpus pairs")
            drop = uniform(t.seed, batch.rows, step, 1, stream=5)[:, 0] < t.cond_dropout
            batch = drop_condition(batch, drop, data.pad_id, data.bos_id)
        return batch.to(self.device)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to ``train.max_steps`` (from the last checkpoint with ``resume``). The main process holds the
        run folder's lock throughout and first removes temp files that killed writes left."""
        if not self.dist.is_main:
            return self._fit()
        with runfolder.RunLock(self.out):
            runfolder.remove_temp_files(self.out)
            return self._fit()

    def _fit(self) -> TrainResult:
        run, t, dist = self.run, self.run.train, self.dist
        torch.manual_seed(t.seed)
        if not self.resume:
            check_pretrained_tokenizer(run)
        tok = self._tokenizer()
        train = build_dataset(run.data, tok, "train")
        valid = build_dataset(run.data, tok, "valid")
        length_prior = None
        if run.data.mode == "lines":  # add-one smoothed lengths, for models that see the padding
            length_prior = (train.length_counts() + 1).astype(float).tolist()
        model, process = build_components(run, tok, length_prior)
        if run.tokenizer.exclude_unreachable:
            check_unreachable_absent(tok, {"train": train, "valid": valid})
        if not self.resume and model.pretrained_init():  # model.init: start from pretrained weights
            torch.manual_seed(t.seed)  # the same stream afterwards as without (reproducible either way)
        model.to(self.device)
        process.to(self.device)
        ema = EMA(model, t.ema)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), fused=False, foreach=False,
        )
        step, tokens_seen, elapsed0 = 0, 0, 0.0
        if self.resume:
            state = load_checkpoint(self.out / CKPT, model, ema, opt)
            step, tokens_seen, elapsed0 = state["step"], state["tokens"], state.get("elapsed_s", 0.0)
            if dist.is_main:
                self._truncate_metrics(step)
                if self.changes:
                    runfolder.record_changes(self.out, step, self.changes)
                # the model folder and manifest as the checkpoint's step left them (it finishes a save that a
                # kill cut short, and carries the resumed config): the files an uninterrupted run wrote there
                self._export(model, tok, length_prior, ema, step)
        elif dist.is_main:
            atomic_write_text(self.out / "config.json",
                              json.dumps(folder_config(run, tok, length_prior, model), indent=2))
        net = DDP(model) if dist.world > 1 else model
        amp = autocast(self.device, t.bf16)
        logger = _Logger(self.out, t.tensorboard, purge_step=step + 1 if self.resume else None) if dist.is_main \
            else None
        bar = None
        if self.progress and dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=step, desc=run.name, unit="step", dynamic_ncols=True)
        t0, win_tokens, win_t0 = time.perf_counter(), 0, time.perf_counter()
        val = None
        model.train()
        clock = elapsed0  # training seconds so far, the same on every rank (the time-based decay reads it)
        while step < t.max_steps:
            lr = lr_at(step, t, clock)
            for g in opt.param_groups:
                g["lr"] = lr
            model.set_step(step)  # backbones that change with training (attention annealing)
            batches = [self._batch(train, step, m) for m in range(t.grad_accum)]
            n_tok = all_reduce_sum(torch.tensor(float(sum(b.n_tokens for b in batches))), dist).item()
            loss_sum = 0.0
            for m, b in enumerate(batches):
                sync = nullcontext() if (dist.world == 1 or m == t.grad_accum - 1) else net.no_sync()
                with sync:
                    with amp:
                        bound = bind_source(net, process, b.tokens, b.images)
                        terms = process.loss(bound, b)
                        if isinstance(bound, SourceReader) and bound.predicts_length:  # Mask-Predict's length loss
                            terms = terms + F.pad(length_terms(bound, process, b.tokens)[:, None],
                                                  (0, terms.shape[1] - 1))
                        scene = scene_terms(bound, b.image_labels)  # a captioner's auxiliary scene loss, per token
                    loss = terms.float().sum()
                    if scene is not None:  # not part of the bound: trained, not logged as the loss
                        loss = loss + model.cfg.scene_loss * (scene * b.loss_mask.sum(-1)).sum()
                    loss = loss * (dist.world / n_tok)  # DDP averages over ranks
                    loss.backward()
                loss_sum += terms.detach().float().sum().item()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip if t.clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model, step)
            step += 1
            tokens_seen += int(n_tok)
            win_tokens += int(n_tok)
            loss_val = all_reduce_sum(torch.tensor(loss_sum), dist).item() / n_tok
            if bar is not None:
                bar.update(1)
            final = step == t.max_steps
            if t.max_minutes is not None or t.decay_minutes is not None:  # every rank stops at the same step
                mine = elapsed0 + time.perf_counter() - t0
                late = float(t.max_minutes is not None and mine >= 60 * t.max_minutes)
                agreed = all_reduce_sum(torch.tensor([late, mine], dtype=torch.float64), dist)
                final = final or agreed[0].item() > 0
                clock = agreed[1].item() / dist.world
            if dist.is_main and (step % t.log_every == 0 or final):
                now = time.perf_counter()
                tps = win_tokens / max(now - win_t0, 1e-9)
                win_tokens, win_t0 = 0, now
                row = {"step": step, "tokens": tokens_seen, "loss": loss_val, "lr": lr,
                       "grad_norm": float(gn), "tokens_per_s": tps, "val_nelbo": "",
                       "elapsed_s": elapsed0 + now - t0}
                logger.log(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:.0f}")
            if dist.is_main and (step % t.eval_every == 0 or final):
                with ema.applied(model):
                    r = evaluate(model, process, valid, n_samples=1, batch_size=max(self.micro, 8),
                                 seed=1234, max_batches=t.eval_batches, bf16=t.bf16, device=self.device)
                model.train()
                val = r.nelbo
                logger.log({"step": step, "tokens": tokens_seen, "val_nelbo": val,
                            "elapsed_s": elapsed0 + time.perf_counter() - t0})
                if bar is not None:
                    bar.write(f"step {step}: val " + (f"{'NLL' if r.exact else 'NELBO'} {val:.4f} nats/token "
                              f"(ppl ≤ {math.exp(val):.2f})" if r.bound else f"edit loss {val:.4f} nats/token"))
            if step % t.save_every == 0 or final:
                self._save(model, tok, length_prior, ema, opt, {"step": step, "tokens": tokens_seen,
                                          "elapsed_s": elapsed0 + time.perf_counter() - t0})
            if final:
                break
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        return TrainResult(self.out, step, tokens_seen, val, elapsed0 + time.perf_counter() - t0)

    def _save(self, model, tok: Tokenizer, length_prior, ema: EMA, opt, state: dict) -> None:
        """checkpoint, then the model folder, then the manifest (runfolder's order)."""
        if self.dist.is_main:
            save_checkpoint(self.out / CKPT, model, ema, opt, state)
            self._export(model, tok, length_prior, ema, state["step"])
        barrier(self.dist)

    def _export(self, model, tok: Tokenizer, length_prior, ema: EMA, step: int) -> None:
        """The model folder (EMA weights) and the manifest naming the checkpoint and the model files."""
        training = model.training
        with ema.applied(model):
            write_model_folder(self.out, model, tok, self.run, length_prior, step,
                               (CKPT, *runfolder.MODEL_FILES))
        model.train(training)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log rows written after the checkpoint we resume from (and a row a kill cut short), so the
        curve has no duplicates; rewritten atomically."""
        path = self.out / METRICS
        if not path.is_file():
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if _row_step(r) is not None and _row_step(r) <= step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(path, buf.getvalue())


def _row_step(row: dict) -> int | None:
    """A metrics row's step, or None for a row a kill cut short (missing fields)."""
    try:
        return int(row["step"]) if row.get(FIELDS[-1]) not in (None, "") else None
    except (TypeError, ValueError):
        return None


class _Logger:
    """metrics.csv, plus TensorBoard event files under tb/ when the tensorboard package is installed;
    ``purge_step``: on resume, TensorBoard drops the events at and after it."""

    def __init__(self, out: Path, tensorboard: bool, purge_step: int | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / METRICS
        new = not path.is_file()
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=FIELDS)
        if new:
            self.w.writeheader()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=purge_step)
            except ImportError:
                print("difflm: tensorboard is not installed; logging to metrics.csv only "
                      "(pip install tensorboard to get event files)")

    def log(self, row: dict) -> None:
        self.w.writerow({k: row.get(k, "") for k in FIELDS})
        self.f.flush()
        fault_point("metrics.csv:row")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()
