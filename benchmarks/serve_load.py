"""Load and soak for ``difflm serve``: 1, 8 and 32 concurrent clients against one server on 127.0.0.1.

    python benchmarks/serve_load.py --run runs/quickstart/mdlm [--requests 64] [--steps 32] [--soak 500]

Each level sends the same ``--requests`` generate requests (one row each, seeds 0..n−1) from that many clients
at once, each client one request after another; the 1-client level is sequential serving. Reported per level:
p50 / p99 latency, requests/s, tokens/s, the ratios against sequential serving, failed requests, and the server's
peak RSS. Every answer is checked against the sequential one for its seed (same seed ⇒ same text, whatever shares
the batch). Goal (issue 23): at 32 clients, throughput ≥ 4× sequential with p99 latency under 3× the single-request
latency.

``--rate R``: open-loop arrivals (Poisson, R requests/s, ``--requests`` of them) against a server that lets requests
join a running batch at any step (``--join step``, continuous batching) and one that batches only at batch
boundaries (``--join batch``), side by side: p50 / p99 latency and requests/s. A closed loop of clients cannot show
the difference (they resubmit together, so every batch starts full); arrivals spread in time can.

``--soak N``: N requests from 16 clients, a random mix of valid bodies (checked against their sequential answers),
invalid ones (expecting their 4xx) and clients that disconnect mid-stream; the server's RSS at the end against its
RSS after warm-up (goal: within 10%), and every valid request answered correctly. Run alone (it times things).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx


def rss_kb(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def body(seed: int, a) -> dict:
    return {"num": 1, "steps": a.steps, "seed": seed, **({"length": a.length} if a.length else {})}


async def level(url: str, clients: int, n: int, a, expect: dict | None) -> dict:
    seeds = list(range(n))
    lat, fails, texts = [], 0, {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def client(k: int) -> None:
            nonlocal fails
            for s in seeds[k::clients]:
                t0 = time.perf_counter()
                r = await c.post("/v1/generate", json=body(s, a))
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    fails += 1
                    continue
                texts[s] = r.json()["texts"][0]
                if expect is not None and expect[s] != texts[s]:
                    fails += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"clients": clients, "requests": n, "wall_s": wall, "req_per_s": n / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "failed": fails, "texts": texts}


async def open_loop(url: str, rate: float, n: int, a, expect: dict) -> dict:
    """n requests arriving at Poisson times of ``rate`` per second, each on its own connection."""
    rng = random.Random(1)
    lat, fails = [], 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n)) as c:
        async def one(s: int, at: float) -> None:
            nonlocal fails
            await asyncio.sleep(at)
            t0 = time.perf_counter()
            r = await c.post("/v1/generate", json=body(s, a))
            lat.append(time.perf_counter() - t0)
            fails += r.status_code != 200 or r.json()["texts"][0] != expect[s]

        times, t = [], 0.0
        for _ in range(n):
            t += rng.expovariate(rate)
            times.append(t)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(s, at) for s, at in zip(range(n), times)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"rate": rate, "requests": n, "wall_s": wall, "req_per_s": n / wall, "p50_s": statistics.median(lat),
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "failed": fails}


def start_server(run: str, join: str, a) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen([sys.executable, "-m", "difflm.cli", "serve", run, "--port", str(port),
                            "--max-batch", "64", "--max-queue", "256", "--join", join])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/v1/models", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    asyncio.run(level(url, 1, 4, a, None))  # warm-up
    return srv, url


def stop(srv: subprocess.Popen) -> None:
    srv.terminate()
    srv.wait(timeout=30)


async def soak(url: str, n: int, a, expect: dict, pid: int) -> dict:
    rng = random.Random(0)
    bad = [({"num": 1, "steps": 10**6}, 400), ({"colour": 1}, 422), ({"length": 10**6}, 400),
           ({"sampler": "nope"}, 400), ({"model": "nope"}, 404), ({"temperature": -1}, 422)]
    wrong, answered, disconnects = 0, 0, 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def one(i: int) -> None:
            nonlocal wrong, answered, disconnects
            kind = rng.random()
            if kind < 0.6:
                s = rng.randrange(len(expect))
                r = await c.post("/v1/generate", json=body(s, a))
                answered += 1
                wrong += r.status_code != 200 or r.json()["texts"][0] != expect[s]
            elif kind < 0.85:
                b, status = rng.choice(bad)
                r = await c.post("/v1/generate", json=b)
                wrong += r.status_code != status
            else:  # read the first streamed event, then go away
                disconnects += 1
                async with c.stream("POST", "/v1/generate", json={**body(rng.randrange(1000), a), "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        break

        sem = asyncio.Semaphore(16)

        async def guarded(i: int) -> None:
            async with sem:
                await one(i)

        warm = rss_kb(pid)
        await asyncio.gather(*(guarded(i) for i in range(n)))
    await asyncio.sleep(1.0)
    end = rss_kb(pid)
    return {"requests": n, "valid_answered": answered, "wrong": wrong, "disconnects": disconnects,
            "rss_after_warmup_mb": warm / 1024, "rss_end_mb": end / 1024, "rss_growth": end / warm - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/quickstart/mdlm")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--length", type=int, default=None)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--soak", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0, help="open-loop arrivals per second (0: none)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/serve-load.json"))
    a = ap.parse_args()
    if not Path(a.run, "config.json").is_file():
        sys.exit(f"serve_load: no model folder at {a.run}; run `make demo` first or pass --run RUN")
    srv, url = start_server(a.run, "step", a)
    try:
        rows, expect = [], None
        for clients in map(int, a.levels.split(",")):
            r = asyncio.run(level(url, clients, a.requests, a, expect))
            expect = expect or r["texts"]
            r.pop("texts")
            r["peak_rss_mb"] = rss_kb(srv.pid, "VmHWM") / 1024
            rows.append(r)
            print(json.dumps(r), flush=True)
        base = rows[0]
        out = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}",
               "run": a.run, "steps": a.steps, "rows": rows}
        if a.soak:
            out["soak"] = asyncio.run(soak(url, a.soak, a, expect, srv.pid))
            print(json.dumps(out["soak"]), flush=True)
    finally:
        stop(srv)
    if a.rate:
        out["open_loop"] = {}
        for join in ("step", "batch"):
            srv, url = start_server(a.run, join, a)
            try:
                out["open_loop"][join] = asyncio.run(open_loop(url, a.rate, a.requests, a, expect))
                print(join, json.dumps(out["open_loop"][join]), flush=True)
            finally:
                stop(srv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    cfg = json.loads(Path(a.run, "config.json").read_text())
    L = a.length or cfg["run"]["data"]["seq_len"]  # a row's tokens (lines models pad after [EOS])
    print(f"\n{out['date']}, {out['machine']}, {a.run}, {a.steps} steps, {a.requests} requests per level\n")
    print("| clients | requests/s | × sequential | tokens/s | p50 latency (s) | p99 latency (s) | p99 / single | "
          "failed | peak RSS (MB) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['req_per_s']:.2f} | {r['req_per_s'] / base['req_per_s']:.1f} | "
              f"{r['req_per_s'] * L:.0f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['p99_s'] / base['p50_s']:.1f} | "
              f"{r['failed']} | {r['peak_rss_mb']:.0f} |")
    if a.rate:
        print(f"\nopen loop: {a.requests} requests, Poisson arrivals at {a.rate:g}/s\n")
        print("| requests join | requests/s | p50 latency (s) | p99 latency (s) | p99 / single | failed |\n"
              "|---|---:|---:|---:|---:|---:|")
        for join, r in out["open_loop"].items():
            print(f"| at {'any step' if join == 'step' else 'batch boundaries'} | {r['req_per_s']:.2f} | "
                  f"{r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['p99_s'] / base['p50_s']:.1f} | {r['failed']} |")


if __name__ == "__main__":
    main()
