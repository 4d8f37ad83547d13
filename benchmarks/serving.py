"""Serve: HTTP latency and throughput of routed inference (``benchmarks/serve_latency.py``).

Benchmarks ``--run DIR``, or first trains one (the config's; configs/smoke.yaml with --quick,
reusing a finished run with the same config under ``<out>/runs``).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import common, serve_latency


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    if ctx.run:
        run_dir = Path(ctx.run).resolve()
    else:
        common.say("serve: training the run to serve")
        run_dir = common.train_run(ctx, ctx.cfg(), "served")["dir"]
    requests = ctx.requests or (16 if ctx.quick else 200)
    common.say(f"serve: deploying {run_dir} on Ray Serve; {requests} requests per (batch, concurrency, body) cell")
    res = serve_latency.run_benchmark(run_dir, requests)
    ctx.devices.add(res["device"])
    res["requests"] = requests
    metrics = {}
    for r in res["rows"]:
        cell = f"b{r['batch']}_c{r['concurrency']}_{r['format']}"
        metrics.update(
            {f"{cell}/{k}": v for k, v in r.items() if k not in ("batch", "concurrency", "format", "phases_ms")}
        )
        metrics.update({f"{cell}/phase_{k}_ms": v for k, v in r.get("phases_ms", {}).items()})
    metrics["healthy_s"] = res["healthy_s"]
    metrics["http_floor_p50_ms"] = res["http_floor"]["p50_ms"]
    metrics["raw_bytes_per_sample"] = res["raw_bytes_per_sample"]
    return res, f"Run: `{run_dir}`, {requests} requests per cell.\n\n" + serve_latency.markdown(res), metrics
