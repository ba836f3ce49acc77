"""The serving engine: one worker thread that owns the models and runs requests in step-synchronous batches.

Requests for the same model whose jobs share a ``DiffusionLM.batch_key`` (sampler and options, steps, temperature,
top-p, guidance, row length) and that wait while a batch runs form the next batch, up to ``max_batch`` rows. Each
row draws its noise from its own request's seed and its index within that request (the counter-based RNG), so a
request gets the same text whatever else shares its batch. Requests join at batch boundaries: difflm's samplers run
a whole trajectory per call, so no row joins a batch mid-trajectory.

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

from ..pipeline import DiffusionLM, Job
from ..sampling.base import StepInfo


class ServeError(Exception):
    """A request's error: HTTP ``status``, the request ``field`` it concerns (or None), extra ``headers``."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.headers = status, field, headers or {}


class _Abort(Exception):
    """Raised from a step callback to stop a batch whose every request was cancelled."""


@dataclass
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
    """Serves ``models`` (name -> DiffusionLM) from one worker thread; ``max_queue`` waiting requests at most."""

    def __init__(self, models: dict[str, DiffusionLM], *, max_batch: int = 32, max_queue: int = 64,
                 bf16: bool = True) -> None:
        self.models, self.max_batch, self.max_queue, self.bf16 = models, max_batch, max_queue, bf16
        self.queue: list[Pending] = []
        self.cv = threading.Condition()
        self.running = True
        self.batches: list[int] = []  # requests per batch run so far (tests and /v1/stats read it)
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
            try:
                self._run(batch)
            except BaseException as e:  # the server never dies from a request
                for p in batch:
                    p.resolve(error=e if isinstance(e, Exception) else RuntimeError(str(e)))

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
                else:
                    changed = (cur != p._last).nonzero().tolist()
                    p.emit({"event": "step", "step": step, "steps": info.steps, "nfe": info.nfe[lo:hi].tolist(),
                            "changes": [[r, i, self._piece(lm, int(cur[r, i]))] for r, i in changed]})
                p._last = cur.clone()

        streaming = any(p.events is not None for p in batch)
        try:
            results = lm.run_jobs([p.job for p in batch], bf16=self.bf16, on_step=on_step if streaming else None)
        except _Abort:
            return
        for p, r in zip(batch, results):
            p.resolve(r)

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
