"""Serving benchmark: HTTP latency and throughput of routed inference vs the same forward in-process.

    nmoe bench serve [--run runs/default] [--requests 200]

For (batch, concurrency, body format) cells (top-k = 2): p50/p99 latency, requests/s and samples/s
over real HTTP on 127.0.0.1 from one async HTTP client, each request sent to its client's own URL
(``Served.clients``: the replica's own port under direct ingress), beside the in-process routed
forward (``training.routing.route_in_process``); the bytes per routed sample vs the raw input; the
HTTP floor (a client route with no model work); a sustained load (many users for a while, counting
errors and degraded answers); and the time from deploy to healthy.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from serve import api  # noqa: E402
from training import checkpoint as ckpt  # noqa: E402
from training import gates, routing, seeds  # noqa: E402
from training.config import PAPER_VARIANT  # noqa: E402
from training.datasets import load_dataset, normalize  # noqa: E402

TOP_K = 2
# (batch, concurrency, body format): the targets' cells first, then the JSON path beside them
CELLS = ((1, 1, "npy"), (32, 8, "npy"), (1, 32, "npy"), (1, 8, "npy"), (32, 1, "npy"), (1, 1, "json"), (32, 8, "json"))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def in_process(run: Path, pixels: np.ndarray, batch: int, repeats: int) -> dict:
    """The same routed forward (client 0, the paper's variant) with every module in this process."""
    t = ckpt.load_trained(run)
    cfg = t["config"]
    facts = ckpt.data_facts(t["meta"])
    m = ckpt.build_modules(t, PAPER_VARIANT)
    ext, experts, gate = m["extractor"], m["experts"], m["gates"][0]
    spec = gates.get(PAPER_VARIANT)
    lat = []
    for r in range(repeats):
        x = torch.from_numpy(pixels[(r * batch) % (len(pixels) - batch) :][:batch])
        t0 = time.perf_counter()
        with torch.no_grad():
            h = ext(normalize(x, facts["mean"], facts["std"]))
            idx, w = spec.choose(gate, h, TOP_K, None, cfg.num_clients, seeds.routing(cfg.seed, 0))
            routing.route_in_process(h, idx, w, experts, 0, cfg.routing.fp16_latents, spec.readout(gate))
        lat.append(time.perf_counter() - t0)
    return {
        "p50_ms": 1e3 * _pct(lat, 0.5),
        "p99_ms": 1e3 * _pct(lat, 0.99),
        "samples_per_s": batch * len(lat) / sum(lat),
    }


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _session(concurrency: int):
    """The load generator: one aiohttp session (aiohttp comes with Ray), ``concurrency`` connections kept alive. It
    costs the shared cores about 1 ms less per request than httpx (``benchmarks/results/serve.md``)."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=60)
    )


async def _send(http, url: str, kind: str = "", body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request: POST ``body`` as ``kind``, or GET without a body; (status, headers, body)."""
    call = http.post(url, data=body, headers={"Content-Type": kind}) if body else http.get(url)
    async with call as resp:
        return resp.status, resp.headers, await resp.read()


async def _load(bodies: list[tuple[str, bytes]], path, concurrency: int, requests: int) -> dict:
    """``concurrency`` users of one async HTTP client, ``requests`` in all (``path(r)``: request r's URL); latency
    per request."""
    lat: list[float] = []
    phases: list[dict[str, float]] = []  # per request: the replica's Server-Timing, and the rest ("outside")
    tally = [0, 0]
    async with _session(concurrency) as http:

        async def one(r: int) -> None:
            kind, body = bodies[r % len(bodies)]
            t0 = time.perf_counter()
            status, headers, data = await _send(http, path(r), kind, body)
            if status != 200:
                raise RuntimeError(f"{path(r)}: HTTP {status}: {data[:300]!r}")
            lat.append(time.perf_counter() - t0)
            inside = api.read_phases(headers.get(api.TIMING_HEADER, ""))
            if inside:
                phases.append({**inside, "outside": 1e3 * lat[-1] - sum(inside.values())})
            if body:
                reply = json.loads(data)
                tally[0] += reply["bytes_out"] + reply["bytes_in"]
                tally[1] += len(reply["predictions"])

        async def user(u: int, count: int) -> None:
            for r in range(u, count, concurrency):
                await one(r)

        await asyncio.gather(*(user(u, min(requests, 2 * concurrency)) for u in range(concurrency)))  # warm-up
        lat.clear()
        phases.clear()
        tally[:] = [0, 0]
        t0 = time.perf_counter()
        await asyncio.gather(*(user(u, requests) for u in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "p50_ms": 1e3 * statistics.median(lat),
        "p99_ms": 1e3 * _pct(lat, 0.99),
        "requests_per_s": requests / wall,
        "bytes_per_sample": tally[0] / max(1, tally[1]),
        "phases_ms": {k: statistics.median(p.get(k, 0.0) for p in phases) for k in (phases[0] if phases else {})},
    }


def over_http(urls: list[str], pixels: np.ndarray, batch: int, concurrency: int, requests: int, fmt: str):
    """Routed predicts, ``batch`` images each, as .npy bodies (what nmoe predict sends) or JSON, request r to client
    ``urls[r % len(urls)]``."""
    chunks = [pixels[(r * batch) % (len(pixels) - batch) :][:batch] for r in range(32)]
    if fmt == "npy":
        bodies = [("application/x-npy", _npy(c)) for c in chunks]
    else:
        bodies = [("application/json", json.dumps({"inputs": c.tolist()}).encode()) for c in chunks]
    res = asyncio.run(_load(bodies, lambda r: f"{urls[r % len(urls)]}/predict?top_k={TOP_K}", concurrency, requests))
    return {**res, "samples_per_s": batch * res["requests_per_s"]}


def http_floor(urls: list[str], requests: int) -> dict:
    """GET /v1/clients/{i} at client i's URL: the same request path and replica with no model work, the floor."""
    return asyncio.run(_load([("", b"")], lambda r: urls[r % len(urls)], 1, requests))


def sustained(urls: list[str], pixels: np.ndarray, users: int, seconds: float) -> dict:
    """``users`` concurrent users sending single images (.npy) for ``seconds``: requests, errors (a transport error
    or any status but 200) and degraded answers (a peer that did not answer, though every peer is up)."""
    import aiohttp

    bodies = [_npy(pixels[r : r + 1]) for r in range(64)]
    seen = {"requests": 0, "errors": 0, "degraded": 0}
    lat: list[float] = []

    async def main() -> None:
        async with _session(users) as http:
            end = time.perf_counter() + seconds

            async def user(u: int) -> None:
                r = u
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    url = f"{urls[r % len(urls)]}/predict?top_k={TOP_K}"
                    try:
                        status, _, data = await _send(http, url, "application/x-npy", bodies[r % len(bodies)])
                        ok = status == 200
                        seen["degraded"] += ok and json.loads(data)["degraded"]
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        ok = False
                    seen["requests"] += 1
                    seen["errors"] += not ok
                    lat.append(time.perf_counter() - t0)
                    r += users

            await asyncio.gather(*(user(u) for u in range(users)))

    asyncio.run(main())
    return {
        **seen,
        "users": users,
        "seconds": seconds,
        "requests_per_s": seen["requests"] / seconds,
        "p50_ms": 1e3 * statistics.median(lat),
        "p99_ms": 1e3 * _pct(lat, 0.99),
    }


def run_benchmark(
    run: Path, requests: int = 200, port: int | None = None, sustain: tuple[int, float] = (50, 60)
) -> dict:
    """Deploy ``run``, measure every cell, the floor and ``sustain`` (users, seconds), and shut Serve down."""
    import ray

    from actors.cluster import connect
    from serve import launch

    t = ckpt.load_trained(run)
    cfg = t["config"]
    ds = load_dataset(cfg.data)
    pixels = ds.raw(ds.x_test[:2048]).numpy()
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    owned = not ray.is_initialized()  # a caller's Ray (tests, nmoe bench) stays up afterwards
    connect()
    served = launch.deploy(run, PAPER_VARIANT, "127.0.0.1", port, max_batch=256)
    n = len(served.clients)
    urls = [served.clients[i]["url"] for i in sorted(served.clients)]
    rows = []
    try:
        floor = http_floor(urls, requests)
        local = {b: in_process(run, pixels, b, max(50, requests // 2)) for b in {b for b, _, _ in CELLS}}
        for batch, conc, fmt in CELLS:
            rows.append(
                {
                    "batch": batch,
                    "concurrency": conc,
                    "format": fmt,
                    **over_http(urls, pixels, batch, conc, requests, fmt),
                    "in_process_p50_ms": local[batch]["p50_ms"],
                    "in_process_samples_per_s": local[batch]["samples_per_s"],
                }
            )
        load = sustained(urls, pixels, *sustain)
    finally:
        launch.shutdown()
        if owned:
            ray.shutdown()
    raw = int(np.prod(ds.x_test.shape[1:])) * 4
    return {
        "run": str(run),
        "top_k": TOP_K,
        "clients": n,
        "healthy_s": served.seconds,
        "device": served.device,
        "http_floor": floor,
        "direct_ingress": served.direct,
        "sustained": load,
        "raw_bytes_per_sample": raw,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available()},
    }


# the serving targets on the project's 2-core machine, default run (10 clients): (label, value, bound, at most)
TARGETS = (
    ("single image p50 ms", lambda r: _cell(r, 1, 1)["p50_ms"], 8, True),
    ("single image p99 ms", lambda r: _cell(r, 1, 1)["p99_ms"], 20, True),
    ("batch 32 at concurrency 8, samples/s", lambda r: _cell(r, 32, 8)["samples_per_s"], 2500, False),
    ("single images at concurrency 32, requests/s", lambda r: _cell(r, 1, 32)["requests_per_s"], 200, False),
    ("sustained load: errors", lambda r: r["sustained"]["errors"], 0, True),
    ("sustained load: degraded answers", lambda r: r["sustained"]["degraded"], 0, True),
    ("deploy to healthy s", lambda r: r["healthy_s"], 15, True),
)


def _cell(res: dict, batch: int, concurrency: int) -> dict:
    return next(r for r in res["rows"] if (r["batch"], r["concurrency"], r["format"]) == (batch, concurrency, "npy"))


def targets(res: dict) -> str:
    """The targets' table for one run: each target, the measured value, and whether it holds."""
    lines = ["| target | bound | measured | holds |", "|---|---|---|---|"]
    for label, get, bound, at_most in TARGETS:
        value = get(res)
        holds = value <= bound if at_most else value >= bound
        lines.append(f"| {label} | {'≤' if at_most else '≥'} {bound} | {value:,.1f} | {'yes' if holds else 'no'} |")
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    f, load = res["http_floor"], res["sustained"]
    path = (
        "each request to its client's own port (Serve's direct ingress)"
        if res["direct_ingress"]
        else "each request through its client's node's Serve proxy"
    )
    lines = [
        f"Routed inference over HTTP (top-k {res['top_k']}, {res['clients']} client applications, {path}, on one "
        f"machine: {res['machine']['cpus']} cores shared with the load generator; GPU: {res['machine']['gpu']}). "
        f"Raw input: {res['raw_bytes_per_sample']} B/sample. Deploy to healthy: {res['healthy_s']:.1f} s. HTTP floor "
        f"(GET /v1/clients/{{i}}, no model work): p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms. Sustained: "
        f"{load['users']} users sending single images for {load['seconds']:.0f} s: {load['requests']:,} requests "
        f"({load['requests_per_s']:.0f}/s, p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms), "
        f"{load['errors']} errors, {load['degraded']} degraded answers.",
        "",
        "| batch | concurrency | body | p50 ms | p99 ms | requests/s | samples/s | bytes/sample on the wire "
        "| in-process p50 ms | in-process samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['batch']} | {r['concurrency']} | {r['format']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['requests_per_s']:.0f} | {r['samples_per_s']:.0f} | {r['bytes_per_sample']:.0f} "
            f"| {r['in_process_p50_ms']:.2f} | {r['in_process_samples_per_s']:.0f} |"
        )
    names = list(dict.fromkeys(k for r in res["rows"] for k in r.get("phases_ms", {})))
    if names:
        lines += [
            "",
            "Where a predict's time goes, median ms per request: inside client i's replica from the handler's "
            "Server-Timing header (`body`: reading it, `decode`: checking it, `f`: F, `gate`: choosing, `expert`: the "
            "own expert, `peers`: the peers' calls, `combine`, `encode`: the JSON reply), and `outside`: the rest of "
            "what the HTTP client waited (Serve's proxy and request path, the network stack, the client itself).",
            "",
            "| batch | concurrency | body | " + " | ".join(names) + " |",
            "|---|---|---|" + "---|" * len(names),
        ]
        for r in res["rows"]:
            cells = " | ".join(f"{r['phases_ms'].get(k, 0.0):.2f}" for k in names)
            lines.append(f"| {r['batch']} | {r['concurrency']} | {r['format']} | {cells} |")
    return "\n".join(lines) + "\n"
