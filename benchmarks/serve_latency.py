"""Serving benchmark: HTTP latency and throughput of routed inference vs the same forward in-process.

    nmoe bench serve [--run runs/default] [--requests 200]

For (batch, concurrency, body format) cells (top-k = 2): p50/p99 latency, requests/s and samples/s
over real HTTP on 127.0.0.1 from one async HTTP client, beside the in-process routed forward
(``training.routing.route_in_process``); the bytes per routed sample vs the raw input; the HTTP
floor (a client route with no model work); and the time from deploy to healthy.
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


async def _load(url: str, bodies: list[tuple[str, bytes]], path, concurrency: int, requests: int) -> dict:
    """``concurrency`` users of one async HTTP client, ``requests`` in all; latency per request."""
    import httpx

    lat: list[float] = []
    phases: list[dict[str, float]] = []  # per request: the replica's Server-Timing, and the rest ("outside")
    tally = [0, 0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def one(r: int) -> None:
            kind, body = bodies[r % len(bodies)]
            t0 = time.perf_counter()
            resp = await (
                http.post(path(r), content=body, headers={"Content-Type": kind}) if body else http.get(path(r))
            )
            resp.raise_for_status()
            lat.append(time.perf_counter() - t0)
            inside = api.read_phases(resp.headers.get(api.TIMING_HEADER, ""))
            if inside:
                phases.append({**inside, "outside": 1e3 * lat[-1] - sum(inside.values())})
            if body:
                reply = resp.json()
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


def over_http(url: str, pixels: np.ndarray, batch: int, concurrency: int, requests: int, clients: int, fmt: str):
    """Routed predicts, ``batch`` images each, as .npy bodies (what nmoe predict sends) or JSON."""
    chunks = [pixels[(r * batch) % (len(pixels) - batch) :][:batch] for r in range(32)]
    if fmt == "npy":
        bodies = [("application/x-npy", _npy(c)) for c in chunks]
    else:
        bodies = [("application/json", json.dumps({"inputs": c.tolist()}).encode()) for c in chunks]
    res = asyncio.run(
        _load(url, bodies, lambda r: f"/v1/clients/{r % clients}/predict?top_k={TOP_K}", concurrency, requests)
    )
    return {**res, "samples_per_s": batch * res["requests_per_s"]}


def http_floor(url: str, requests: int, clients: int) -> dict:
    """GET /v1/clients/{i}: the same proxy and client replica with no model work, the HTTP floor."""
    return asyncio.run(_load(url, [("", b"")], lambda r: f"/v1/clients/{r % clients}", 1, requests))


def run_benchmark(run: Path, requests: int = 200, port: int | None = None) -> dict:
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
    rows = []
    try:
        floor = http_floor(served.url, requests, n)
        local = {b: in_process(run, pixels, b, max(50, requests // 2)) for b in {b for b, _, _ in CELLS}}
        for batch, conc, fmt in CELLS:
            rows.append(
                {
                    "batch": batch,
                    "concurrency": conc,
                    "format": fmt,
                    **over_http(served.url, pixels, batch, conc, requests, n, fmt),
                    "in_process_p50_ms": local[batch]["p50_ms"],
                    "in_process_samples_per_s": local[batch]["samples_per_s"],
                }
            )
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
        "raw_bytes_per_sample": raw,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available()},
    }


def markdown(res: dict) -> str:
    f = res["http_floor"]
    lines = [
        f"Routed inference over HTTP (top-k {res['top_k']}, {res['clients']} client applications, each its own "
        f"ingress, on one machine: {res['machine']['cpus']} cores shared with the load generator; GPU: "
        f"{res['machine']['gpu']}). Raw input: {res['raw_bytes_per_sample']} B/sample. Deploy to healthy: "
        f"{res['healthy_s']:.1f} s. HTTP floor (GET /v1/clients/{{i}}, no model work): p50 {f['p50_ms']:.1f} ms, "
        f"p99 {f['p99_ms']:.1f} ms.",
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
