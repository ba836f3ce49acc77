"""``difflm serve``: an HTTP API over one or more run folders, and the web playground at ``/``.

    GET  /v1/models     each model: family, tokenizer, context, samplers and their options
    POST /v1/generate   {model, num, length, prompt | source, sampler, steps, seed, temperature, top_p, options,
                         guidance, stream}
    POST /v1/infill     {model, text with [MASK] / ___, span_tokens, num, candidates, sampler, steps, seed, ..., stream}
    POST /v1/revise     {model, text, steps, beam: [b, r], greedy, seed}  (edit families)
    POST /v1/score      {model, texts, samples}: NELBO (exact NLL for autoregressive) per text
    GET  /v1/stats      queue length and batches run

``"stream": true`` answers with server-sent events: ``start`` (the rows as they begin), one ``step`` per reverse step
(the positions whose token changed: [row, position, token]; edit families: whole rows), then ``done`` with the
answer, NFE and seconds (or ``error``). Errors are JSON ``{"error": "...", "field": "..."}`` with a 4xx status:
400 bad values, 404 unknown model, 413 oversize body, 422 malformed or unknown fields, 429 full queue (with
Retry-After), 504 timeout. The app needs the ``serve`` extra: ``pip install 'difflm[serve]'``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..errors import DiffLMError
from ..pipeline import DiffusionLM, Generation, Job
from ..registry import option_fields, samplers
from ..sampling import sampler_fits
from .engine import Engine, Pending, ServeError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # pragma: no cover - exercised where the extra is missing
    raise DiffLMError("difflm serve needs FastAPI and uvicorn: pip install 'difflm[serve]'") from e

EDIT_FAMILIES = ("edit", "editflow")


@dataclass
class Limits:
    max_batch: int = 32  # rows per batch
    max_queue: int = 64  # waiting requests
    max_steps: int = 1024
    max_num: int = 64  # rows per request
    max_body: int = 1 << 20  # bytes
    timeout_s: float = 300.0
    join: str = "step"  # where waiting requests join a running batch: "step" (continuous batching) or "batch"


class Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    sampler: str | None = None
    steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    options: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False


class GenerateBody(Common):
    num: int = Field(1, ge=1)
    length: int | None = Field(None, ge=1)
    prompt: str | None = None
    source: str | None = None
    guidance: float = 0.0


class InfillBody(Common):
    text: str
    span_tokens: int = Field(4, ge=1)
    num: int = Field(1, ge=1)
    candidates: int = Field(1, ge=1)  # fills per version; the most likely whole text is kept


class ReviseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    text: str
    steps: int | None = Field(None, ge=1)
    beam: list[int] | None = None
    greedy: bool | None = None  # DiffusER: argmax unless false
    seed: int = Field(0, ge=0, lt=2**63)


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    texts: list[str] = Field(min_length=1, max_length=64)
    samples: int = Field(16, ge=1, le=256)


def _error(status: int, message: str, field: str | None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before the app reads it."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                r = _error(413, f"the body is {int(length)} bytes; the limit is {self.limit}", "body")
                await r(scope, receive, send)
                return
        await self.app(scope, receive, send)


def model_card(name: str, lm: DiffusionLM) -> dict:
    """What a client needs to build a request for this model."""
    fam = lm.process.family
    smps = []
    for cls in (c for c in samplers(fam) if c.fits(lm.process)):
        opts = [{"name": f.name, "default": f.default if not callable(f.default) else None,
                 "type": getattr(f.type, "__name__", str(f.type)), "help": f.metadata.get("help", "")}
                for f in option_fields(cls.Options, cli_only=True)]
        smps.append({"name": cls.name, "options": opts})
    preferred = lm.preferred_sampler()
    tok = {"kind": lm.tokenizer.kind, "vocab_size": lm.tokenizer.vocab_size}
    return {"name": name, "family": fam, "tokenizer": tok,
            "context": lm.seq_len, "mode": lm.run.data.mode, "seq2seq": lm.run.data.mode == "pairs",
            "revises": fam in EDIT_FAMILIES, "default_sampler": preferred or type(lm.process).default_sampler,
            "default_steps": lm.run.sample.steps, "default_options": lm.run.sample.options if preferred else {},
            "samplers": smps}


def create_app(models: dict[str, DiffusionLM], limits: Limits | None = None, *, bf16: bool = True) -> FastAPI:
    """The ASGI app serving ``models`` (name -> DiffusionLM); its engine is ``app.state.engine``."""
    lim = limits or Limits()
    engine = Engine(models, max_batch=lim.max_batch, max_queue=lim.max_queue, bf16=bf16,
                    continuous=lim.join == "step")
    app = FastAPI(title="difflm", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=lim.max_body)
    app.router.on_shutdown.append(engine.close)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError) -> JSONResponse:
        return _error(e.status, str(e), e.field, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return _error(400, f"malformed JSON: {err.get('msg', '')}", "body")
        field = ".".join(loc) or "body"
        if err.get("type") == "extra_forbidden":
            return _error(422, f"unknown field {field!r}", field)
        return _error(422, f"{field}: {err.get('msg', 'invalid')}", field)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(e).__name__}: {e}", None)

    def pick(name: str | None) -> tuple[str, DiffusionLM]:
        if name is None:
            name = next(iter(models))
        if name not in models:
            raise ServeError(404, f"no model {name!r}; served: {', '.join(models)}", "model")
        return name, models[name]

    def check_steps(steps: int | None) -> None:
        if steps is not None and steps > lim.max_steps:
            raise ServeError(400, f"steps is {steps}; this server allows at most {lim.max_steps}", "steps")

    def check(lm: DiffusionLM, body: Common, num: int) -> None:
        check_steps(body.steps)
        if num > lim.max_num:
            raise ServeError(400, f"num is {num}; this server allows at most {lim.max_num} per request", "num")
        if body.sampler is not None and not sampler_fits(body.sampler, lm.process):
            names = ", ".join(c.name for c in samplers(lm.process.family) if c.fits(lm.process))
            raise ServeError(400, f"no sampler {body.sampler!r} for this {lm.process.family} model; its samplers: "
                             f"{names}", "sampler")

    def prepare(lm: DiffusionLM, make, field: str | None) -> tuple[Job, tuple]:
        """Build the job and its batch key, mapping the library's one-line errors to 400s."""
        try:
            job = make()
            key = lm.batch_key(job)
        except DiffLMError as e:
            msg = str(e)
            f = "options" if "option" in msg else "length" if "--length" in msg else field
            raise ServeError(400, msg, f) from None
        return job, key

    async def run(name: str, lm: DiffusionLM, job: Job, key: tuple, stream: bool, answer) -> Any:
        loop = asyncio.get_running_loop()
        p = Pending(name, loop, loop.create_future(), job=job, key=key,
                    events=asyncio.Queue() if stream else None,
                    variable_length=lm.process.family in EDIT_FAMILIES)
        engine.submit(p)
        if not stream:
            try:
                result = await asyncio.wait_for(asyncio.shield(p.future), lim.timeout_s)
            except asyncio.TimeoutError:
                p.cancel()
                raise ServeError(504, f"the request took longer than {lim.timeout_s:g} s", None) from None
            except DiffLMError as e:
                raise ServeError(400, str(e), None) from None
            return JSONResponse({**answer(result), "seconds": time.perf_counter() - p.started})
        return StreamingResponse(events(p, answer), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(p: Pending, answer):
        deadline = p.started + lim.timeout_s
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(p.events.get())
                done, _ = await asyncio.wait({getter, p.future}, timeout=max(0.0, deadline - time.perf_counter()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    ev = getter.result()
                    yield f"event: {ev.pop('event')}\ndata: {json.dumps(ev)}\n\n"
                    continue
                getter.cancel()
                if not done:
                    p.cancel()
                    yield f"event: error\ndata: {json.dumps({'error': 'timed out', 'field': None})}\n\n"
                    return
                while not p.events.empty():  # steps reported before the answer arrived
                    ev = p.events.get_nowait()
                    yield f"event: {ev.pop('event')}\ndata: {json.dumps(ev)}\n\n"
                try:
                    result = p.future.result()
                except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
                    yield f"event: error\ndata: {json.dumps({'error': str(e), 'field': None})}\n\n"
                    return
                payload = {**answer(result), "seconds": time.perf_counter() - p.started}
                yield f"event: done\ndata: {json.dumps(payload)}\n\n"
                return
        finally:
            if getter is not None:
                getter.cancel()
            p.cancel()  # a client that went away frees its place (and its batch, when it was alone)

    def generation(g: Generation) -> dict:
        return {"texts": g.texts, "nfe": g.nfe.tolist()}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files("difflm.serve").joinpath("playground.html").read_text("utf-8"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"models": [model_card(n, lm) for n, lm in models.items()]}

    @app.get("/v1/stats")
    async def stats() -> dict:
        return engine.stats()

    @app.post("/v1/generate")
    async def generate(body: GenerateBody):
        name, lm = pick(body.model)
        check(lm, body, body.num)
        if body.length is not None and body.length > lm.seq_len:
            raise ServeError(400, f"length is {body.length}; the model's context is {lm.seq_len}", "length")
        common = {"steps": body.steps, "sampler": body.sampler, "seed": body.seed, "temperature": body.temperature,
                  "top_p": body.top_p, "sampler_options": body.options}
        if body.source is not None:
            if lm.run.data.mode != "pairs":
                raise ServeError(400, f"model {name!r} is not a seq2seq model; leave out source", "source")
            job, key = prepare(lm, lambda: lm.prepare_targets([body.source], candidates=body.num, mbr=False,
                                                               guidance=body.guidance, **common), "source")
            return await run(name, lm, job, key, body.stream, lambda tr: {
                "texts": tr[0].candidates, "nfe": [tr[0].nfe] * len(tr[0].candidates)})
        if lm.run.data.mode == "pairs":
            raise ServeError(400, f"model {name!r} is a seq2seq model: give it a source", "source")
        job, key = prepare(lm, lambda: lm.prepare_generate(body.num, body.length, prompt=body.prompt, **common),
                           "prompt")
        return await run(name, lm, job, key, body.stream, generation)

    @app.post("/v1/infill")
    async def infill(body: InfillBody):
        name, lm = pick(body.model)
        check(lm, body, body.num)
        if body.num * body.candidates > lim.max_num:
            raise ServeError(400, f"num × candidates is {body.num * body.candidates}; this server allows at most "
                             f"{lim.max_num} rows per request", "candidates")
        if lm.process.family in EDIT_FAMILIES or lm.run.data.mode == "pairs":
            raise ServeError(400, f"model {name!r} ({lm.process.family}, {lm.run.data.mode}) does not infill",
                             "model")
        job, key = prepare(lm, lambda: lm.prepare_infill(
            body.text, span_tokens=body.span_tokens, steps=body.steps, sampler=body.sampler, seed=body.seed,
            temperature=body.temperature, top_p=body.top_p, num=body.num, candidates=body.candidates,
            sampler_options=body.options), "text")
        texts = job.finish
        job.finish = lambda toks, nfe: {"texts": texts(toks, nfe), "nfe": nfe.tolist()}
        return await run(name, lm, job, key, body.stream, lambda answer: answer)

    async def unbatched(name: str, work) -> Any:
        loop = asyncio.get_running_loop()
        p = Pending(name, loop, loop.create_future(), work=work)
        engine.submit(p)
        try:
            return await asyncio.wait_for(asyncio.shield(p.future), lim.timeout_s), p
        except asyncio.TimeoutError:
            p.cancel()
            raise ServeError(504, f"the request took longer than {lim.timeout_s:g} s", None) from None

    @app.post("/v1/revise")
    async def revise(body: ReviseBody):
        name, lm = pick(body.model)
        if lm.process.family not in EDIT_FAMILIES:
            raise ServeError(400, f"model {name!r} is {lm.process.family}; revise needs an edit-family model",
                             "model")
        check_steps(body.steps)
        if body.beam is not None and (len(body.beam) != 2 or min(body.beam) < 1):
            raise ServeError(400, "beam takes [b, r], both at least 1", "beam")

        def work() -> dict:
            return lm.revise(body.text, steps=body.steps, beam=tuple(body.beam) if body.beam else None,
                             seed=body.seed, greedy=body.greedy, bf16=engine.bf16)

        try:
            result, p = await unbatched(name, work)
        except DiffLMError as e:
            raise ServeError(400, str(e), "text") from None
        return {**result, "seconds": time.perf_counter() - p.started}

    @app.post("/v1/score")
    async def score(body: ScoreBody):
        name, lm = pick(body.model)
        try:
            result, p = await unbatched(name, lambda: lm.score(body.texts, n_samples=body.samples))
        except DiffLMError as e:
            raise ServeError(400, str(e), "texts") from None
        return {"scores": result, "seconds": time.perf_counter() - p.started}

    return app
