"""Serve: HTTP latency and throughput of routed inference (``benchmarks/serve_latency.py``).

Benchmarks ``--run DIR``; else the config's run (10 clients by default) and the smoke config's (3 clients), each
trained first unless a finished run with the same config is under ``<out>/runs``. ``--quick``: the smoke run only,
with a short sustained load. The targets' table is for the first run benchmarked.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import common, serve_latency


def _runs(ctx: common.Context) -> list[Path]:
    if ctx.run:
        return [Path(ctx.run).resolve()]
    from training.config import absolute_paths, load_config

    common.say("serve: training (or reusing) the runs to serve")
    runs = [common.train_run(ctx, ctx.cfg(), "served")["dir"]]
    if not ctx.quick:
        smoke = absolute_paths(load_config(common.QUICK_CONFIG, ctx.overrides))
        runs.append(common.train_run(ctx, smoke, "served-smoke")["dir"])
    return runs


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    requests = ctx.requests or (16 if ctx.quick else 200)
    sustain = (8, 3.0) if ctx.quick else (50, 60.0)
    results, parts, metrics = [], [], {}
    for run_dir in _runs(ctx):
        common.say(f"serve: deploying {run_dir} on Ray Serve; {requests} requests per (batch, concurrency, body) cell")
        res = serve_latency.run_benchmark(run_dir, requests, sustain=sustain)
        ctx.devices.add(res["device"])
        results.append(res)
        parts.append(f"## {res['clients']} clients\n\nRun: `{run_dir}`.\n\n" + serve_latency.markdown(res))
        tag = f"n{res['clients']}"
        for r in res["rows"]:
            cell = f"{tag}/b{r['batch']}_c{r['concurrency']}_{r['format']}"
            metrics.update(
                {f"{cell}/{k}": v for k, v in r.items() if k not in ("batch", "concurrency", "format", "phases_ms")}
            )
            metrics.update({f"{cell}/phase_{k}_ms": v for k, v in r.get("phases_ms", {}).items()})
        metrics.update({f"{tag}/sustained_{k}": v for k, v in res["sustained"].items()})
        metrics[f"{tag}/healthy_s"] = res["healthy_s"]
        metrics[f"{tag}/http_floor_p50_ms"] = res["http_floor"]["p50_ms"]
    head = (
        f"{requests} requests per cell. The targets (2-core machine, default run, 10 clients), for the "
        f"{results[0]['clients']}-client run:\n\n" + serve_latency.targets(results[0])
    )
    return {"requests": requests, "runs": results}, head + "\n" + "\n".join(parts), metrics
