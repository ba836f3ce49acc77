"""The serving engine: one worker thread that owns the models and runs requests in step-synchronous batches.

Requests for the same model whose jobs share a ``DiffusionLM.batch_key`` (sampler and options, steps, temperature,
top-p, guidance, row length) and that wait while a batch runs form the next batch, up to ``max_batch`` rows. Each
row draws its noise from its own request's seed and its index within that request (the counter-based RNG), so a
request gets the same text whatever else shares its batch.

**Continuous batching**: with a stepwise sampler (``Sampler.stepwise``: the masked family's ancestral and cached
samplers) every row keeps its own clock, so a request that arrives while a batch runs joins it at the next step
and a finished request leaves at once, freeing its rows. A request joins only while no older request of another key
waits (that one runs as soon as the batch drains). Other samplers run a whole trajectory per call and batch at
batch boundaries.

Streaming requests receive, after every reverse step, the positions whose token changed; a request whose client
went away is dropped from the queue, and a batch whose every request went away stops at the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..pipeline import DiffusionLM, Job, Plan
from ..precision import autocast
from ..sampling.base import StepInfo


class ServeError(Exception):
    """A request's error: HTTP ``status``, the request ``field`` it concerns (or None), extra ``headers``."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.headers = status, field, headers or {}


class _Abort(Exception):
    """Raised from a step callback to stop a batch whose every request was cancelled."""


@dataclass(eq=False)  # a request is itself: compared and hashed by identity
class Pending:
    """A request in the queue: a batchable ``job`` (with its ``key``), or unbatched ``work`` (revise, score)."""

    model: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    job: Job | None = None
    key: tuple | None = None
    work: Callable[[], Any] | None = None
    events: asyncio.Queue | None = None  # streamed step events, when the client asked for them
    variable_length: bool = False  # edit families: stream whole rows, positions shift
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)
    _last: torch.Tensor | None = None
    _step: int = 0

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: dict) -> None:
        if self.events is not None and not self.cancelled:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        def done() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(done)


class Engine:
    """Serves ``models`` (name -> DiffusionLM) from one worker thread; ``max_queue`` waiting requests at most;
    ``continuous``: stepwise samplers take new rows at every step (else only at batch boundaries)."""

    def __init__(self, models: dict[str, DiffusionLM], *, max_batch: int = 32, max_queue: int = 64,
                 bf16: bool = True, continuous: bool = True) -> None:
        self.models, self.max_batch, self.max_queue, self.bf16 = models, max_batch, max_queue, bf16
        self.continuous = continuous  # False: requests join only at batch boundaries (benchmarks compare)
        self.queue: list[Pending] = []
        self.cv = threading.Condition()
        self.running = True
        self.batches: list[int] = []  # requests per batch run so far (tests and /v1/stats read it)
        self._inflight: list[Pending] = []  # the requests the worker is running (an error reaches them all)
        self.thread = threading.Thread(target=self._loop, name="difflm-serve", daemon=True)
        self.thread.start()

    def submit(self, p: Pending) -> None:
        with self.cv:
            live = [q for q in self.queue if not q.cancelled]
            if len(live) >= self.max_queue:
                raise ServeError(429, f"the queue is full ({self.max_queue} requests waiting); retry shortly",
                                 headers={"Retry-After": "1"})
            self.queue.append(p)
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.running = False
            self.cv.notify()
        self.thread.join(timeout=10)

    def stats(self) -> dict:
        with self.cv:
            waiting = sum(not q.cancelled for q in self.queue)
        return {"waiting": waiting, "batches": len(self.batches), "requests": sum(self.batches)}

    # -- the worker --------------------------------------------------------------------------------
    def _take(self) -> list[Pending]:
        """The next batch: the oldest live request and every waiting one that can share its batch."""
        with self.cv:
            while self.running and not any(not q.cancelled for q in self.queue):
                self.cv.wait()
            if not self.running:
                return []
            self.queue = [q for q in self.queue if not q.cancelled]
            head = self.queue.pop(0)
            if head.job is None:
                return [head]
            batch, rows, rest = [head], head.job.rows, []
            for q in self.queue:
                if q.job is not None and q.model == head.model and q.key == head.key \
                        and rows + q.job.rows <= self.max_batch:
                    batch.append(q)
                    rows += q.job.rows
                else:
                    rest.append(q)
            self.queue = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            self._inflight = list(batch)
            try:
                plan = self._stepwise_plan(batch[0])
                if plan is not None:
                    self._run_stepwise(batch, plan)
                else:
                    self._run(batch)
            except BaseException as e:  # the server never dies from a request
                for p in self._inflight:
                    p.resolve(error=e if isinstance(e, Exception) else RuntimeError(str(e)))
            self._inflight = []

    def _stepwise_plan(self, p: Pending) -> Plan | None:
        """The head request's plan when its batch runs step by step (continuous batching), else None."""
        if not self.continuous or p.job is None or p.variable_length:
            return None
        plan = self.models[p.model].plan(p.job)
        return plan if plan.sampler.stepwise else None

    def _join(self, head: Pending, room: int) -> list[Pending]:
        """Waiting requests that can join ``head``'s running batch now: same model and key, ``room`` rows at most,
        taken in arrival order and only up to the first live request of another key (it must not starve)."""
        with self.cv:
            self.queue = [q for q in self.queue if not q.cancelled]
            joined, rest, blocked = [], [], False
            for q in self.queue:
                fits = q.job is not None and q.model == head.model and q.key == head.key
                if not blocked and fits and q.job.rows <= room:
                    joined.append(q)
                    room -= q.job.rows
                else:
                    blocked = blocked or not fits
                    rest.append(q)
            self.queue = rest
            return joined

    def _run_stepwise(self, batch: list[Pending], plan: Plan) -> None:
        """Continuous batching: rows of new requests join at every step; a request leaves when its rows are done."""
        head = batch[0]
        lm = self.models[head.model]
        traj, owners = None, []  # owners[i]: the request that row i belongs to
        self.batches.append(0)

        def admit(ps: list[Pending]) -> None:
            nonlocal traj
            parts = [] if traj is None else [traj]
            for p in ps:
                part = lm.begin_job(p.job, plan)
                parts.append(part)
                owners.extend([p] * len(part))
                p._last, p._step = part.x.cpu(), 0
                p.emit({"event": "start", "steps": None, "rows": self._rows(lm, p, p._last)})
                if p not in self._inflight:
                    self._inflight.append(p)
            traj = type(parts[0]).cat(parts) if len(parts) > 1 else parts[0]
            self.batches[-1] += len(ps)  # before any of them is answered

        with autocast(lm.device, self.bf16):  # one context for the batch's life: weights are cast once, not per step
            admit(batch)
            while owners:
                gone = torch.tensor([p.cancelled for p in owners])
                if gone.any():  # a client went away: its rows leave the batch
                    traj = traj.take(~gone.to(traj.k.device))
                    owners = [p for p in owners if not p.cancelled]
                    if not owners:
                        break
                traj = lm.advance(plan, traj, bf16=self.bf16)
                x, nfe, done = traj.x.cpu(), traj.nfe.cpu(), traj.done.cpu()
                for p in dict.fromkeys(owners):  # each request once, in row order
                    rows = torch.tensor([q is p for q in owners])
                    p._step += 1
                    if p.events is not None and not p.cancelled:
                        self._emit_changes(lm, p, x[rows], p._step, plan.steps, nfe[rows])
                    if bool(done[rows].all()):
                        p.resolve(p.job.finish(x[rows], nfe[rows]))
                if done.any():
                    traj = traj.take(~done.to(traj.k.device))
                    owners = [p for p, d in zip(owners, done.tolist()) if not d]
                room = self.max_batch - len(owners)
                if owners and room > 0:  # an empty batch ends; the next request starts a new one
                    joined = self._join(head, room)
                    if joined:
                        admit(joined)

    def _run(self, batch: list[Pending]) -> None:
        self.batches.append(len(batch))
        if batch[0].work is not None:
            p = batch[0]
            p.resolve(p.work())
            return
        lm = self.models[batch[0].model]
        spans, a = [], 0
        for p in batch:
            spans.append((a, a + p.job.rows))
            a += p.job.rows
            p._last = p.job.cond.tokens.clone()
            p.emit({"event": "start", "steps": None, "rows": self._rows(lm, p, p._last)})

        def on_step(info: StepInfo) -> None:
            if all(p.cancelled for p in batch):
                raise _Abort
            x = info.tokens.cpu()
            for p, (lo, hi) in zip(batch, spans):
                if p.events is None or p.cancelled:
                    continue
                cur = x[lo:hi]
                step = info.steps - info.step + 1  # 1, 2, ... in the order the steps run
                if p.variable_length:
                    p.emit({"event": "step", "step": step, "steps": info.steps, "rows": self._rows(lm, p, cur),
                            "nfe": info.nfe[lo:hi].tolist()})
                    p._last = cur.clone()
                else:
                    self._emit_changes(lm, p, cur.clone(), step, info.steps, info.nfe[lo:hi])

        streaming = any(p.events is not None for p in batch)
        try:
            results = lm.run_jobs([p.job for p in batch], bf16=self.bf16, on_step=on_step if streaming else None)
        except _Abort:
            return
        for p, r in zip(batch, results):
            p.resolve(r)

    def _emit_changes(self, lm: DiffusionLM, p: Pending, cur: torch.Tensor, step: int, steps: int,
                      nfe: torch.Tensor) -> None:
        """A fixed-length request's step event: the positions whose token changed since its last event (rows
        ``cur``, (N, L), become the new last)."""
        changed = (cur != p._last).nonzero().tolist()
        p.emit({"event": "step", "step": step, "steps": steps, "nfe": nfe.tolist(),
                "changes": [[r, i, self._piece(lm, int(cur[r, i]))] for r, i in changed]})
        p._last = cur

    @staticmethod
    def _piece(lm: DiffusionLM, t: int) -> str:
        """A token as the client shows it: "[MASK]" for the mask, nothing for [EOS] and [PAD], else its text."""
        tok = lm.tokenizer
        if t == tok.mask_id:
            return "[MASK]"
        return "" if t in (tok.eos_id, tok.pad_id) else tok.decode([t])

    @classmethod
    def _rows(cls, lm: DiffusionLM, p: Pending, x: torch.Tensor) -> list[list[str]]:
        """Each row's tokens as text pieces (edit families: up to [EOS])."""
        if p.variable_length:
            return [[cls._piece(lm, t) for t in seq] for seq in lm.process.sequences(x)]
        return [[cls._piece(lm, int(t)) for t in row] for row in x]
