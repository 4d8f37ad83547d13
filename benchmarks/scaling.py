"""Scaling: 5, 10, 20 and 40 clients (3 and 6 with --quick) on the same dataset (the total data is
fixed and split over more clients): seconds per stage-1 round, bytes per round, and the peak
resident memory of the Ray worker processes during the run; how each grows with N. Each run
stops after stage 3: evaluation (and its centralized baseline) says nothing about scaling.

Per client: the mean PSS of the ``ray::Client`` processes when their sum peaks, beside the
torch-import floor: the PSS, at that moment, of an idle actor that imported what a client
imports and holds nothing (it maps the same libraries, so it gets the same share of them).

Memory: every 0.5 s, the sums of the RSS and of the PSS of this Ray node's processes whose
name or command line starts with ``ray::`` (the Coordinator, the clients, idle workers). RSS
counts shared pages (torch's libraries, the object store's mapped memory) once per process,
so its sum overstates; PSS splits each shared page among the processes that map it, so its
sum is what the processes really occupy.
"""

from __future__ import annotations

import threading

import numpy as np

from benchmarks import common
from training.config import PAPER_VARIANT


class RaySampler:
    """Peak summed RSS and PSS of ``ray::`` processes, sampled in a thread."""

    def __init__(self, every: float = 0.5):
        import psutil  # ray ships it (ray/thirdparty_files) and puts it on sys.path

        self.psutil, self.every = psutil, every
        self.peak, self.peak_pss, self.peak_count, self.baseline, self._stop = 0, 0, 0, 0, threading.Event()
        self.clients_pss, self.client_pss, self.floor_pss = 0, 0.0, 0  # at the peak of the clients' summed PSS
        self.session = None
        try:
            import ray

            self.session = ray._private.worker._global_node.get_session_dir_path()
        except Exception:  # no session dir known: count every ray:: process on the machine
            pass

    def _roots(self) -> list:
        if not self.session:
            return []
        ps = self.psutil
        return [
            p
            for p in ps.process_iter(["name", "cmdline"])
            if (p.info["name"] or "").startswith("raylet") and self.session in " ".join(p.info["cmdline"] or [])
        ]

    def sample(self) -> tuple[int, int, int]:
        """``(sum of RSS, sum of PSS, processes)``; PSS falls back to RSS where the kernel hides it."""
        ps, total, pss, count = self.psutil, 0, 0, 0
        clients: list[int] = []
        roots = self._roots()
        procs = [c for r in roots for c in r.children(recursive=True)] if roots else list(ps.process_iter())
        for p in procs:
            try:
                name, cmd = p.name(), p.cmdline()
                title = cmd[0] if cmd and cmd[0].startswith("ray::") else name
                if title.startswith("ray::"):
                    full = p.memory_full_info()
                    one = getattr(full, "pss", full.rss)
                    total += full.rss
                    pss += one
                    count += 1
                    if title.startswith("ray::Client"):
                        clients.append(one)
                    elif title.startswith("ray::TorchFloor"):
                        self._floor_now = one
            except ps.Error:
                continue
        if clients and sum(clients) > self.clients_pss:
            self.clients_pss, self.client_pss = sum(clients), sum(clients) / len(clients)
            self.floor_pss = getattr(self, "_floor_now", 0)
        return total, pss, count

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            total, pss, count = self.sample()
            if total > self.peak:
                self.peak, self.peak_count = total, count
            self.peak_pss = max(self.peak_pss, pss)

    def __enter__(self) -> "RaySampler":
        self.baseline, _, _ = self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def slope(ns: list[int], ys: list[float]) -> float | None:
    """Exponent k of y ~ N^k (least squares on log-log)."""
    if len(ns) < 2 or min(ys) <= 0:
        return None
    return float(np.polyfit(np.log(ns), np.log(ys), 1)[0])


class TorchFloor:
    """An idle actor that imports what a client imports and holds nothing: torch, the client module,
    and torch._dynamo, which torch.optim imports at its first step (about 78 MB here)."""

    def __init__(self):
        import torch
        import torch._dynamo  # noqa: F401

        import actors.client  # noqa: F401

        torch.set_num_threads(1)

    def ready(self) -> bool:
        return True


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    import ray

    counts = (3, 6) if ctx.quick else (5, 10, 20, 40)
    rows = []
    floor = ray.remote(TorchFloor).options(num_cpus=0).remote()
    ray.get(floor.ready.remote())
    for k, n in enumerate(counts):
        common.say(f"scaling: run {k + 1}/{len(counts)}: {n} clients")
        cfg = ctx.cfg(f"num_clients={n}")
        with RaySampler() as mem:
            r = common.train_run(ctx, cfg, f"scale-n{n}", stop_after="stage3", cache=False)
        res = r["results"]
        hist = res["history"]["stage1"]
        b = res["bytes"]
        rows.append(
            {
                "clients": n,
                "stage1_seconds_per_round": float(np.mean([h["seconds"] for h in hist])),
                "stage1_bytes_per_round": float(np.mean([h["bytes_down"] + h["bytes_up"] for h in hist])),
                "stage3_fedgate_bytes_per_round": b["stage3_variants"].get(PAPER_VARIANT, 0) / cfg.stage3.rounds,
                "stage3_answers_bytes": b["stage3_answers"],
                "setup_seconds": res["timings"]["setup"],
                "wall_seconds": r["wall"],
                "peak_rss_mib": mem.peak / 2**20,
                "peak_pss_mib": mem.peak_pss / 2**20,
                "client_pss_mib": mem.client_pss / 2**20,
                "floor_pss_mib": mem.floor_pss / 2**20,
                "baseline_rss_mib": mem.baseline / 2**20,
                "ray_processes_at_peak": mem.peak_count,
            }
        )
    ray.kill(floor)
    keys = (
        "stage1_seconds_per_round",
        "stage1_bytes_per_round",
        "stage3_fedgate_bytes_per_round",
        "stage3_answers_bytes",
        "setup_seconds",
        "wall_seconds",
        "peak_rss_mib",
        "peak_pss_mib",
    )
    growth = {key: slope(list(counts), [row[key] for row in rows]) for key in keys}
    result = {"clients": list(counts), "rows": rows, "growth_exponent": growth, "config": ctx.cfg().to_dict()}
    metrics = {f"n{row['clients']}/{k}": v for row in rows for k, v in row.items() if k != "clients"}
    metrics.update({f"growth/{k}": v for k, v in growth.items() if v is not None})
    return result, markdown(result), metrics


def markdown(r: dict) -> str:
    cfg, n = r["config"], "{:,.0f}".format
    rows = [
        [
            x["clients"],
            f"{x['stage1_seconds_per_round']:.2f}",
            n(x["stage1_bytes_per_round"]),
            n(x["stage3_fedgate_bytes_per_round"]),
            n(x["stage3_answers_bytes"]),
            f"{x['setup_seconds']:.1f}",
            f"{x['wall_seconds']:.1f}",
            f"{x['peak_pss_mib']:.0f}",
            f"{x['peak_rss_mib']:.0f}",
            x["ray_processes_at_peak"],
            f"{x.get('client_pss_mib', 0):.0f}",
            f"{x.get('floor_pss_mib', 0):.0f}",
            f"{x.get('client_pss_mib', 0) - x.get('floor_pss_mib', 0):+.0f}",
        ]
        for x in r["rows"]
    ]
    g = r["growth_exponent"]
    fmt = lambda k: "—" if g[k] is None else f"N^{g[k]:.2f}"  # noqa: E731
    train = cfg["data"]["train_limit"] or "all"
    return (
        f"{cfg['data']['name']} ({train} training samples split over N clients, {cfg['partition']['method']}), "
        f"stage-1 rounds {cfg['stage1']['rounds']}, stage-3 rounds {cfg['stage3']['rounds']}. "
        "Peak PSS / RSS: the sums over "
        "this node's `ray::` processes, sampled every 0.5 s over the whole run (PSS shares each shared page among its "
        "processes; RSS counts it once per process). PSS per client: the mean over the `ray::Client` processes when "
        "their sum peaks; torch floor: at that moment, the PSS of an idle actor that imported what a client imports "
        "and holds nothing.\n\n"
        + common.table(
            [
                "clients",
                "stage-1 s / round",
                "stage-1 bytes / round",
                "fedgate bytes / round",
                "stage-3 answers bytes",
                "setup s",
                "wall to stage 3 s",
                "peak PSS MiB",
                "peak RSS MiB",
                "ray:: processes",
                "PSS per client MiB",
                "torch floor MiB",
                "client − floor MiB",
            ],
            rows,
        )
        + "\n## Growth with N (least-squares exponent k of value ~ N^k)\n\n"
        + common.table(
            [
                "stage-1 s / round",
                "stage-1 bytes / round",
                "fedgate bytes / round",
                "answers bytes",
                "setup s",
                "wall to stage 3",
                "peak PSS",
                "peak RSS",
            ],
            [
                [
                    fmt(k)
                    for k in (
                        "stage1_seconds_per_round",
                        "stage1_bytes_per_round",
                        "stage3_fedgate_bytes_per_round",
                        "stage3_answers_bytes",
                        "setup_seconds",
                        "wall_seconds",
                        "peak_pss_mib",
                        "peak_rss_mib",
                    )
                ]
            ],
        )
    )
