"""``difflm serve``: every endpoint, every error, streaming event order, and step-synchronous batching that gives
each request what it would get alone (same seed ⇒ same text, whatever shares the batch)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from difflm.components import build_components, write_model_folder  # noqa: E402
from difflm.config import RunConfig  # noqa: E402
from difflm.data.tokenizers import train_char  # noqa: E402
from difflm.pipeline import DiffusionLM  # noqa: E402
from difflm.serve.app import Limits, create_app  # noqa: E402
from difflm.serve.engine import Pending  # noqa: E402


def tiny(path, process: dict, data: dict, seed: int, sample: dict | None = None) -> DiffusionLM:
    tok = train_char(["abcdefgh ijklmnop"])
    run = RunConfig.from_dict({"model": {"n_layer": 1, "n_head": 2, "d_model": 32}, "process": process,
                               "data": {"seq_len": 16, **data}, "sample": {"steps": 8, **(sample or {})}})
    torch.manual_seed(seed)
    model, _ = build_components(run, tok)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.3 * torch.randn_like(q))
    write_model_folder(path, model.eval(), tok, run, None)
    return DiffusionLM.from_pretrained(path, device="cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    return {"mdlm": tiny(d / "mdlm", {"type": "masked"}, {"mode": "lines"}, 0),
            "ar": tiny(d / "ar", {"type": "autoregressive"}, {"mode": "lines"}, 1),
            "s2s": tiny(d / "s2s", {"type": "masked"}, {"corpus": "pairs"}, 2),
            "edit": tiny(d / "edit", {"type": "edit", "steps": 3}, {"corpus": "pairs"}, 3)}


@pytest.fixture(scope="module")
def client(models):
    app = create_app(models, Limits(max_steps=64, max_body=4096), bf16=False)
    with TestClient(app) as c:
        yield c


def sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for chunk in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_models_lists_families_context_and_sampler_options(client):
    cards = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(cards) == {"mdlm", "ar", "s2s", "edit"}
    assert cards["mdlm"]["family"] == "masked" and cards["mdlm"]["context"] == 16
    assert cards["s2s"]["seq2seq"] and cards["edit"]["revises"] and not cards["mdlm"]["revises"]
    names = {s["name"] for s in cards["mdlm"]["samplers"]}
    assert {"ancestral", "confidence"} <= names, names
    conf = next(s for s in cards["mdlm"]["samplers"] if s["name"] == "confidence")
    assert conf["options"] and all({"name", "default", "type", "help"} <= set(o) for o in conf["options"])


def test_a_models_sample_options_are_its_card_defaults_and_apply_when_no_sampler_is_named(tmp_path):
    """An AR model whose config decodes greedily by default (``sample.options``): its card says so, a request that
    names no sampler gets the greedy text, one that names the sampler draws."""
    lm = tiny(tmp_path / "ar", {"type": "autoregressive"}, {"mode": "lines"}, 1,
              sample={"sampler": "autoregressive", "options": {"greedy": True}})
    greedy = lm.generate(3, seed=5, bf16=False, sampler_options={"greedy": True}).texts
    drawn = lm.generate(3, seed=5, bf16=False, sampler="autoregressive").texts
    assert greedy != drawn
    with TestClient(create_app({"ar": lm}, bf16=False)) as c:
        card = c.get("/v1/models").json()["models"][0]
        assert card["default_sampler"] == "autoregressive" and card["default_options"] == {"greedy": True}
        assert c.post("/v1/generate", json={"model": "ar", "num": 3, "seed": 5}).json()["texts"] == greedy
        named = {"model": "ar", "num": 3, "seed": 5, "sampler": "autoregressive"}
        assert c.post("/v1/generate", json=named).json()["texts"] == drawn


def test_generate_matches_the_library_and_streams_its_steps_in_order(client, models):
    body = {"model": "mdlm", "num": 2, "steps": 6, "seed": 7}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    alone = models["mdlm"].generate(2, steps=6, seed=7, bf16=False)
    assert r.json()["texts"] == alone.texts and r.json()["nfe"] == alone.nfe.tolist()
    s = client.post("/v1/generate", json={**body, "stream": True})
    assert s.headers["content-type"].startswith("text/event-stream")
    events = sse(s.text)
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"step"}
    steps = [e["step"] for k, e in events if k == "step"]
    assert steps == sorted(steps) and steps[-1] == 6
    rows = events[0][1]["rows"]  # replaying the changes gives the final rows
    for _, e in events[1:-1]:
        for row, i, tok in e["changes"]:
            rows[row][i] = tok
    assert "[MASK]" not in "".join(rows[0])
    assert events[-1][1]["texts"] == alone.texts and events[-1][1]["seconds"] > 0


def test_infill_seq2seq_revise_and_score(client, models):
    r = client.post("/v1/infill", json={"model": "mdlm", "text": "ab [MASK] cd ___", "seed": 3, "span_tokens": 2})
    assert r.status_code == 200 and r.json()["texts"] == models["mdlm"].infill("ab [MASK] cd ___", seed=3,
                                                                             span_tokens=2, bf16=False)
    ranked = {"model": "mdlm", "text": "ab ___ cd", "seed": 4, "span_tokens": 2, "num": 2, "candidates": 3}
    want = models["mdlm"].infill("ab ___ cd", seed=4, span_tokens=2, num=2, candidates=3, bf16=False)
    assert client.post("/v1/infill", json=ranked).json()["texts"] == want
    ev = sse(client.post("/v1/infill", json={**ranked, "stream": True}).text)
    assert ev[-1][0] == "done" and ev[-1][1]["texts"] == want  # 6 rows stream; the 2 kept come back
    r = client.post("/v1/generate", json={"model": "s2s", "source": "abc def", "num": 2, "seed": 1})
    lib = models["s2s"].generate_targets(["abc def"], candidates=2, mbr=False, seed=1, bf16=False)[0]
    assert r.status_code == 200 and r.json()["texts"] == lib.candidates
    r = client.post("/v1/revise", json={"model": "edit", "text": "abc def", "seed": 2})
    assert r.status_code == 200 and r.json()["text"] == models["edit"].revise("abc def", seed=2, bf16=False)["text"]
    assert all({"step", "ops", "text"} <= set(v) for v in r.json()["revisions"])
    r = client.post("/v1/score", json={"model": "mdlm", "texts": ["abc", "fed cba"], "samples": 4})
    lib = models["mdlm"].score(["abc", "fed cba"], n_samples=4)
    assert r.status_code == 200 and [x["nats"] for x in r.json()["scores"]] == pytest.approx([x["nats"] for x in lib])
    s = client.post("/v1/generate", json={"model": "edit", "source": "abc def", "seed": 2, "stream": True})
    ev = sse(s.text)
    assert ev[-1][0] == "done" and all("rows" in e for k, e in ev if k == "step")  # edit rows change length


@pytest.mark.parametrize("path,body,status,field", [
    ("/v1/generate", {"model": "mdlm", "length": 17}, 400, "length"),
    ("/v1/generate", {"model": "mdlm", "steps": 65}, 400, "steps"),
    ("/v1/generate", {"model": "mdlm", "steps": 0}, 422, "steps"),
    ("/v1/generate", {"model": "mdlm", "sampler": "nope"}, 400, "sampler"),
    ("/v1/generate", {"model": "mdlm", "sampler": "confidence", "options": {"nope": 1}}, 400, "options"),
    ("/v1/generate", {"model": "mdlm", "temperature": 0}, 422, "temperature"),
    ("/v1/generate", {"model": "mdlm", "colour": "red"}, 422, "colour"),
    ("/v1/generate", {"model": "gpt5"}, 404, "model"),
    ("/v1/generate", {"model": "s2s"}, 400, "source"),
    ("/v1/generate", {"model": "mdlm", "source": "abc"}, 400, "source"),
    ("/v1/generate", {"model": "mdlm", "num": 65}, 400, "num"),
    ("/v1/generate", {"model": "mdlm", "prompt": "a" * 40}, 400, "prompt"),
    ("/v1/infill", {"model": "mdlm", "text": "no gaps"}, 400, "text"),
    ("/v1/infill", {"model": "mdlm", "text": "a ___", "num": 9, "candidates": 8}, 400, "candidates"),
    ("/v1/infill", {"model": "mdlm", "text": "a ___", "candidates": 0}, 422, "candidates"),
    ("/v1/revise", {"model": "mdlm", "text": "abc"}, 400, "model"),
    ("/v1/revise", {"model": "edit", "text": "abc", "beam": [0, 1]}, 400, "beam"),
    ("/v1/revise", {"model": "edit", "text": "  "}, 400, "text"),
    ("/v1/score", {"model": "mdlm", "texts": []}, 422, "texts"),
])
def test_bad_requests_get_a_4xx_naming_the_field(client, path, body, status, field):
    r = client.post(path, json=body)
    assert r.status_code == status and r.json()["field"] == field, (r.status_code, r.text)
    assert r.json()["error"]


def test_malformed_and_oversize_bodies_and_the_server_survives(client):
    r = client.post("/v1/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = client.post("/v1/generate", content=b'{"prompt": "' + b"a" * 5000 + b'"}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert client.post("/v1/generate", json={"model": "ar", "seed": 1}).status_code == 200


def test_a_full_queue_is_429_with_retry_after(models):
    app = create_app(models, Limits(max_queue=1), bf16=False)
    with TestClient(app) as c:
        eng = app.state.engine
        loop = asyncio.new_event_loop()
        with eng.cv:  # a waiting request the worker has not been woken for
            eng.queue.append(Pending("mdlm", loop, loop.create_future(), work=lambda: None))
        r = c.post("/v1/generate", json={"model": "mdlm"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        with eng.cv:
            eng.queue.clear()
        assert c.post("/v1/generate", json={"model": "mdlm"}).status_code == 200
        loop.close()


def test_a_request_past_its_timeout_is_504(models):
    app = create_app(models, Limits(timeout_s=1e-4), bf16=False)
    with TestClient(app) as c:
        r = c.post("/v1/generate", json={"model": "mdlm", "num": 8, "steps": 32})
        assert r.status_code == 504 and "longer than" in r.json()["error"]


def test_requests_that_wait_together_share_one_batch_and_get_their_own_texts(models):
    """Five requests (different seeds and sizes) queued while the worker is busy run as one batch; each gets
    exactly what the library gives it alone. A request cancelled while waiting (its client went away) is
    dropped, and a request with another sampler waits for its own batch."""
    app = create_app(models, Limits(), bf16=False)
    eng = app.state.engine
    lm = models["mdlm"]

    async def main():
        loop = asyncio.get_running_loop()
        ps = []
        with eng.cv:  # hold the worker off while the requests arrive
            for seed, num in ((1, 1), (2, 3), (3, 2), (4, 1), (5, 2)):
                job = lm.prepare_generate(num, steps=5, seed=seed)
                p = Pending("mdlm", loop, loop.create_future(), job=job, key=lm.batch_key(job))
                eng.submit(p)
                ps.append((seed, num, p))
            gone = lm.prepare_generate(2, steps=5, seed=9)
            cancelled = Pending("mdlm", loop, loop.create_future(), job=gone, key=lm.batch_key(gone))
            eng.submit(cancelled)
            cancelled.cancel()
            other = lm.prepare_generate(1, steps=5, seed=1, sampler="confidence")
            q = Pending("mdlm", loop, loop.create_future(), job=other, key=lm.batch_key(other))
            eng.submit(q)
        got = [await p.future for _, _, p in ps]
        await q.future
        return got

    got = asyncio.run(main())
    for (seed, num), g in zip(((1, 1), (2, 3), (3, 2), (4, 1), (5, 2)), got):
        assert g.texts == lm.generate(num, steps=5, seed=seed, bf16=False).texts
    assert eng.batches == [5, 1]  # one batch of five, the confidence request alone, the cancelled one never
    eng.close()


def test_run_jobs_equals_each_job_alone_for_every_kind_of_job(models):
    lm, s2s = models["mdlm"], models["s2s"]
    jobs = [lm.prepare_generate(2, steps=4, seed=11), lm.prepare_generate(1, steps=4, seed=12, prompt="ab"),
            lm.prepare_infill("a [MASK] b [MASK]", steps=4, seed=13, num=2)]
    assert len({lm.batch_key(j) for j in jobs}) == 1
    a, b, c = lm.run_jobs(jobs, bf16=False)
    assert a.texts == lm.generate(2, steps=4, seed=11, bf16=False).texts
    assert b.texts == lm.generate(1, steps=4, seed=12, prompt="ab", bf16=False).texts
    assert c == lm.infill("a [MASK] b [MASK]", steps=4, seed=13, num=2, bf16=False)
    tj = [s2s.prepare_targets(["abc"], seed=1, steps=4), s2s.prepare_targets(["de", "fgh"], seed=2, steps=4)]
    x, y = s2s.run_jobs(tj, bf16=False)
    assert [o.prediction for o in y] == [o.prediction for o in s2s.generate_targets(["de", "fgh"], seed=2, steps=4,
                                                                                    bf16=False)]
    assert x[0].prediction == s2s.generate_targets(["abc"], seed=1, steps=4, bf16=False)[0].prediction


def test_run_jobs_whose_rows_finish_at_different_calls(models):
    """Samplers that draw only for the rows still running (confidence, first-hitting, the edit sampler) take each
    row's own job seed along with it: a row batched beside one that finishes earlier gets what it gets alone. (The
    edit sampler has the same fix; this random edit model never ends a row early, so its part checks batching only.)"""
    lm = models["mdlm"]
    for sampler in ("confidence", "first-hitting"):
        # 16 free positions beside 14 and, with more calls than positions, one unmasked a call: the rows with a
        # prompt finish two calls before the rows without
        jobs = [lm.prepare_generate(2, steps=32, seed=11, sampler=sampler),
                lm.prepare_generate(2, steps=32, seed=12, sampler=sampler, prompt="ab")]
        assert len({lm.batch_key(j) for j in jobs}) == 1
        a, b = lm.run_jobs(jobs, bf16=False)
        assert a.texts == lm.generate(2, steps=32, seed=11, sampler=sampler, bf16=False).texts, sampler
        assert b.texts == lm.generate(2, steps=32, seed=12, sampler=sampler, prompt="ab", bf16=False).texts, sampler
    ed = models["edit"]
    sources = [["abc"], ["de fgh ijk", "a"], ["mnop"]]
    jobs = [ed.prepare_targets(src, seed=i + 1) for i, src in enumerate(sources)]
    got = ed.run_jobs(jobs, bf16=False)
    for i, (src, g) in enumerate(zip(sources, got)):
        assert [o.prediction for o in g] == [o.prediction for o in ed.generate_targets(src, seed=i + 1, bf16=False)]


def test_requests_join_a_running_batch_at_any_step_and_leave_when_done(models, monkeypatch):
    """Continuous batching: requests that arrive while a batch runs join it at the next step and leave when their
    own rows are done, each with exactly the library's text for its seed; a request whose client went away leaves
    the batch at once; a request arriving behind an older one of another key waits (no starvation)."""
    lm = models["mdlm"]
    app = create_app(models, Limits(), bf16=False)
    eng = app.state.engine
    calls, arrivals, cancels = [], {}, {}
    real = lm.advance

    def advance(plan, traj, bf16=True):  # the worker's step; requests arrive and leave on cue
        calls.append(len(traj))
        for p in arrivals.pop(len(calls), []):
            eng.submit(p)
        for p in cancels.pop(len(calls), []):
            p.cancel()
        return real(plan, traj, bf16=bf16)

    monkeypatch.setattr(lm, "advance", advance)

    async def main():
        loop = asyncio.get_running_loop()

        def pending(job, stream=False):
            p = Pending("mdlm", loop, loop.create_future(), job=job, key=lm.batch_key(job))
            p.events = asyncio.Queue() if stream else None
            return p

        a = pending(lm.prepare_generate(2, steps=6, seed=1))
        b = pending(lm.prepare_generate(1, steps=6, seed=2), stream=True)
        c = pending(lm.prepare_infill("ab [MASK] cd [MASK]", steps=6, seed=3, num=2))
        arrivals[2] = [b, c]  # arrive during A's second step: they join for step 3
        eng.submit(a)
        got = [await p.future for p in (a, b, c)]
        events = []
        while not b.events.empty():
            events.append(b.events.get_nowait())
        first = (list(calls), list(eng.batches), got, events)

        calls.clear()
        gone = pending(lm.prepare_generate(2, steps=6, seed=4))
        d = pending(lm.prepare_generate(1, steps=6, seed=5, sampler="confidence"))
        e = pending(lm.prepare_generate(1, steps=6, seed=6))
        f = pending(lm.prepare_generate(1, steps=6, seed=7))
        arrivals[1], arrivals[2], cancels[3] = [f], [d, e], [gone]
        eng.submit(gone)
        await f.future
        await d.future
        await e.future
        return first, list(calls), list(eng.batches), f.future.result(), e.future.result()

    (calls1, batches1, (ga, gb, gc), events), calls2, batches2, gf, ge = asyncio.run(main())
    assert calls1 == [2, 2, 5, 5, 5, 5, 3, 3]  # B (1 row) and C (2 rows) joined at step 3; A left after step 6
    assert batches1 == [3]
    assert ga.texts == lm.generate(2, steps=6, seed=1, bf16=False).texts
    assert gb.texts == lm.generate(1, steps=6, seed=2, bf16=False).texts
    assert gc == lm.infill("ab [MASK] cd [MASK]", steps=6, seed=3, num=2, bf16=False)
    assert [ev["event"] for ev in events] == ["start"] + ["step"] * 6
    assert [ev["step"] for ev in events[1:]] == [1, 2, 3, 4, 5, 6]
    # F joins after step 1; the cancelled request's 2 rows leave after step 3; E, behind the older confidence
    # request D, does not join but runs after it
    assert calls2 == [2, 3, 3, 1, 1, 1, 1] + [1] * 6
    assert batches2[len(batches1):] == [2, 1, 1]
    assert gf.texts == lm.generate(1, steps=6, seed=7, bf16=False).texts
    assert ge.texts == lm.generate(1, steps=6, seed=6, bf16=False).texts
    eng.close()
