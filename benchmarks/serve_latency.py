"""Serving benchmark: HTTP latency and throughput of routed inference vs the same forward in-process.

    nmoe bench serve [--run runs/default] [--requests 200]

For batch sizes 1 and 32 at concurrency 1, 8 and 32 (top-k = 2): p50/p99 latency and
samples/s over real HTTP on 127.0.0.1, beside the in-process routed forward
(``training.routing.route_in_process``), and the bytes per routed sample vs the raw input.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training import checkpoint as ckpt  # noqa: E402
from training import gates, routing, seeds  # noqa: E402
from training.config import PAPER_VARIANT  # noqa: E402
from training.data import denormalize, load_dataset, normalize  # noqa: E402

BATCHES, CONCURRENCY, TOP_K = (1, 32), (1, 8, 32), 2


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def in_process(run: Path, pixels: np.ndarray, batch: int, repeats: int) -> dict:
    """The same routed forward (client 0, the paper's variant) with every module in this process."""
    t = ckpt.load_trained(run)
    cfg = t["config"]
    m = ckpt.build_modules(t, PAPER_VARIANT)
    ext, experts, gate = m["extractor"], m["experts"], m["gates"][0]
    spec = gates.get(PAPER_VARIANT)
    lat = []
    for r in range(repeats):
        x = torch.from_numpy(pixels[(r * batch) % (len(pixels) - batch) :][:batch])
        t0 = time.perf_counter()
        with torch.no_grad():
            h = ext(normalize(x, cfg.data.name))
            idx, w = spec.choose(gate, h, TOP_K, None, cfg.num_clients, seeds.routing(cfg.seed, 0))
            routing.route_in_process(h, idx, w, experts, 0, cfg.routing.fp16_latents, spec.readout(gate))
        lat.append(time.perf_counter() - t0)
    return {
        "p50_ms": 1e3 * _pct(lat, 0.5),
        "p99_ms": 1e3 * _pct(lat, 0.99),
        "samples_per_s": batch * len(lat) / sum(lat),
    }


def over_http(url: str, pixels: np.ndarray, batch: int, concurrency: int, requests: int, clients: int = 3) -> dict:
    import httpx

    bodies = [
        json.dumps({"inputs": pixels[(r * batch) % (len(pixels) - batch) :][:batch].tolist(), "top_k": TOP_K})
        for r in range(min(requests, 64))
    ]
    lat, sent = [], [0, 0]
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:

        def one(r: int) -> float:
            t0 = time.perf_counter()
            resp = http.post(
                f"/v1/clients/{r % clients}/predict",
                content=bodies[r % len(bodies)],
                headers={"Content-Type": "application/json"},
            )
            resp.raise_for_status()
            body = resp.json()
            sent[0] += body["bytes_out"] + body["bytes_in"]
            sent[1] += len(body["predictions"])
            return time.perf_counter() - t0

        for r in range(min(8, requests)):  # warm-up: handles, batching queues, connections
            one(r)
        sent[:] = [0, 0]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            lat = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
    return {
        "p50_ms": 1e3 * statistics.median(lat),
        "p99_ms": 1e3 * _pct(lat, 0.99),
        "samples_per_s": batch * requests / wall,
        "bytes_per_sample": sent[0] / max(1, sent[1]),
    }


def run_benchmark(run: Path, requests: int = 200, port: int | None = None) -> dict:
    import ray

    from actors.cluster import connect
    from serve import launch

    t = ckpt.load_trained(run)
    cfg = t["config"]
    ds = load_dataset(cfg.data)
    pixels = denormalize(ds.x_test[:2048], ds.name).numpy()
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    owned = not ray.is_initialized()  # a caller's Ray (tests, nmoe bench) stays up afterwards
    connect()
    url = launch.deploy(run, PAPER_VARIANT, "127.0.0.1", port, max_batch=256)
    rows = []
    try:
        for batch in BATCHES:
            local = in_process(run, pixels, batch, max(50, requests // 2))
            for conc in CONCURRENCY:
                rows.append(
                    {
                        "batch": batch,
                        "concurrency": conc,
                        **over_http(url, pixels, batch, conc, requests, cfg.num_clients),
                        "in_process_p50_ms": local["p50_ms"],
                        "in_process_samples_per_s": local["samples_per_s"],
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
        "raw_bytes_per_sample": raw,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available()},
    }


def markdown(res: dict) -> str:
    lines = [
        f"Routed inference over HTTP (top-k {res['top_k']}, client deployments on one machine, "
        f"{res['machine']['cpus']} cores, GPU: {res['machine']['gpu']}). "
        f"Raw input: {res['raw_bytes_per_sample']} B/sample.",
        "",
        "| batch | concurrency | p50 ms | p99 ms | samples/s | bytes/sample on the wire "
        "| in-process p50 ms | in-process samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['batch']} | {r['concurrency']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['samples_per_s']:.0f} | "
            f"{r['bytes_per_sample']:.0f} | {r['in_process_p50_ms']:.2f} | {r['in_process_samples_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"
