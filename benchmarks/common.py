"""Shared plumbing of the benchmark suites: configs, training runs on Ray, the machine, output.

Every suite module has ``run(ctx) -> (result, markdown, metrics)``; ``finish`` writes
``<out>/<suite>.md`` and ``<suite>.json`` and logs the metrics to an MLflow run in the
experiment ``nmoe-bench``. Training runs go under ``<out>/runs/<name>-<config hash>``; a
finished run with the same config is reused (``--fresh`` retrains) except where a suite
measures time or memory, which always trains anew; a finished run that differs only in
``stage3`` lends its stage-1 and stage-2 checkpoints, so changing a gate re-runs stage 3 only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training import schema
from training.config import DEFAULT_CONFIG
from training.config import SMOKE_CONFIG as QUICK_CONFIG

EXPERIMENT = "nmoe-bench"


def say(msg: str) -> None:
    """Progress for a human: stderr, so ``--json`` keeps stdout clean."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Context:
    suite: str
    quick: bool = False
    out: Path = Path("benchmarks/results")
    config: str | None = None  # None: configs/smoke.yaml with --quick, else configs/default.yaml
    overrides: list[str] = field(default_factory=list)
    tracking_uri: str | None = None  # resolved; None: no MLflow
    fresh: bool = False
    finished_only: bool = False  # accuracy: tabulate the finished runs under <out>/runs, train nothing
    threads: int | None = None  # torch threads of in-process baselines (None: every core)
    run: str | None = None  # serve: an existing finished run
    requests: int | None = None
    devices: set[str] = field(default_factory=set)  # what the training runs' clients computed on

    def cfg(self, *axis: str, quick_tweaks: tuple[str, ...] = ()):
        """The experiment config: base file, the suite's quick tweaks, the user's --set, then the
        suite's own axis (what the benchmark varies wins over --set)."""
        from training.config import absolute_paths, load_config

        base = self.config or (QUICK_CONFIG if self.quick else DEFAULT_CONFIG)
        tweaks = list(quick_tweaks) if self.quick else []
        return absolute_paths(load_config(base, [*tweaks, *self.overrides, *axis]))  # actors run elsewhere


def config_key(cfg) -> str:
    return hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


def _finished(ctx: Context):
    """``(run dir, config dict)`` of every finished run under ``<out>/runs``. Configs are
    compared as loaded, not by the hash in the folder name, so a run made before a config
    field was added still matches a config holding that field's default."""
    from training import checkpoint as ckpt
    from training.config import ConfigError

    for done in sorted((ctx.out / "runs").glob("*/results.json")):
        try:
            yield done.parent.resolve(), ckpt.load_run_config(done.parent).to_dict()
        except (ConfigError, ckpt.RunFolderError):
            continue


def _scored_on_validation(run: Path) -> bool:
    """Whether a run's results hold validation accuracies (runs made before the validation split do not)."""
    methods = schema.load_results(run / "results.json")["methods"]
    return all("val_global_acc" in m for m in methods.values())


def finished_run(ctx: Context, cfg) -> Path | None:
    """Any suite's finished run of this very config under ``<out>/runs``, scored on validation too, or None
    (an older run of the same config still lends its stages 1-2: ``stage12_donor``)."""
    want = cfg.to_dict()
    return next((run for run, have in _finished(ctx) if have == want and _scored_on_validation(run)), None)


def _without_stage3(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "stage3"}


def stage12_donor(ctx: Context, cfg) -> Path | None:
    """A finished run under ``<out>/runs`` whose config differs from ``cfg`` in ``stage3`` only."""
    want = _without_stage3(cfg.to_dict())
    return next((run for run, have in _finished(ctx) if _without_stage3(have) == want), None)


def seed_from_stage2(donor: Path, run_dir: Path, cfg) -> None:
    """Start ``run_dir`` (config ``cfg``) as a run resumed after stage 2: the donor's checkpoints,
    history of stages 1-2 and centralized baseline (the coordinator then runs stage 3 and the
    evaluation)."""
    from training import checkpoint as ckpt

    ckpt.save_config(run_dir, cfg)
    for stage in ("stage1", "stage2"):
        dest = ckpt.stage_file(run_dir, stage)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ckpt.stage_file(donor, stage), dest)
    central = schema.load_results(donor / "results.json")["methods"].get("centralized_moe")
    state = ckpt.load_state(donor)
    if central is None or "val_global_acc" not in central:  # scored before the validation split: again
        central = None
        state.pop("centralized_moe", None)
    ckpt.save_json(run_dir / "state.json", schema.after_stage2(state, central))


def train_run(ctx: Context, cfg, name: str, stop_after: str | None = None, cache: bool = True, reuse_if=None) -> dict:
    """One training run, started exactly as ``nmoe train`` starts it (untracked: the bench run
    holds the numbers). Returns ``{"results", "dir", "wall", "cached"}``. ``reuse_if(run)``: whether a
    finished run of the same config will do (else it lends its stages 1-2 and stage 3 runs again)."""
    import ray

    from actors.coordinator import Coordinator

    key = config_key(cfg)
    run_dir = (ctx.out / "runs" / f"{name}-{key}").resolve()
    if cache and not ctx.fresh and stop_after is None:
        done = finished_run(ctx, cfg)
        if done is not None and (reuse_if is None or reuse_if(done)):
            results = schema.load_results(done / "results.json")
            say(f"{ctx.suite}: {name}: reusing the finished run {done} (same config)")
            _note_devices(ctx, done)
            return {"results": results, "dir": done, "wall": results["timings"].get("total"), "cached": True}
    donor = stage12_donor(ctx, cfg) if cache and not ctx.fresh and stop_after is None else None
    before = None
    if donor == run_dir:  # this config's own run, scored before the validation split: evaluated again
        before = run_dir.with_name(f"{run_dir.name}-before")
        shutil.rmtree(before, ignore_errors=True)
        run_dir.rename(before)
        donor = before
    shutil.rmtree(run_dir, ignore_errors=True)
    if donor is not None:
        say(f"{ctx.suite}: {name}: stages 1-2 from {donor} (differs in stage3 only)")
        seed_from_stage2(donor, run_dir, cfg)
    t0 = time.perf_counter()
    coord = (
        ray.remote(Coordinator)
        .options(num_cpus=0, max_concurrency=4)
        .remote(cfg.to_dict(), str(run_dir), None, None, resume=donor is not None)
    )
    try:
        results = ray.get(coord.run.remote(stop_after))
        wall = time.perf_counter() - t0
    finally:
        try:
            ray.get(coord.shutdown.remote(), timeout=60)
        except ray.exceptions.RayError:  # GetTimeoutError included: it is killed anyway
            pass
        ray.kill(coord)
    if before is not None:
        shutil.rmtree(before, ignore_errors=True)
    say(f"{ctx.suite}: {name}: {wall:.1f}s ({run_dir})")
    _note_devices(ctx, run_dir)
    return {"results": results, "dir": run_dir, "wall": wall, "cached": False}


def _note_devices(ctx: Context, run_dir: Path) -> None:
    """What the run's clients computed on (``state.json``; runs made before it was recorded: cpu)."""
    from training import checkpoint as ckpt

    clients = ckpt.load_state(run_dir).get("meta", {}).get("clients", []) if (run_dir / "state.json").exists() else []
    ctx.devices.update(c.get("device", "cpu") for c in clients)


# ------------------------------------------------------------------ the machine


def machine(used: set[str] | None = None) -> dict:
    """The machine, and the devices the suite's training runs used (``used``: from their clients)."""
    import ray
    import torch

    cpus = ray.cluster_resources().get("CPU") if ray.is_initialized() else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cores": os.cpu_count(),
        "ray_cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "gpu_available": torch.cuda.is_available(),
        "gpu_model": gpu,
        "devices_used": sorted(used or {"cpu"}),
        "gpu_used": any(d.startswith("cuda") for d in used or ()),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine_line(m: dict) -> str:
    if m.get("gpu_used"):
        gpu = f"clients on {m['gpu_model']}"
    else:
        gpu = "none used (CPU only" + (
            f"; a {m.get('gpu_model')} is present)" if m["gpu_available"] else "; none present)"
        )
    if m["ray_cpus"] is None:  # an in-process suite: no Ray, no client actors
        return (
            f"Machine: {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, in one process "
            f"(no Ray); GPU: {gpu}. Python {m['python']}."
        )
    return (
        f"Machine: {m['cores']} cores ({m['ray_cpus']:g} Ray CPUs), torch {m['torch']} with "
        f"{m['torch_threads']} threads in the driver; each client actor uses max(1, floor(Ray CPUs / clients)) "
        f"threads; GPU: {gpu}. Ray {m['ray']}, Python {m['python']}."
    )


# ------------------------------------------------------------------ formatting and output


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def seed_cell(got: list[tuple[float, float]]) -> dict:
    """Mean and std over seeds of ``(personalized, global)`` accuracies: one table cell."""
    pm, ps = mean_std([p for p, _ in got])
    gm, gs = mean_std([g for _, g in got])
    return {"personalized_mean": pm, "personalized_std": ps, "global_mean": gm, "global_std": gs, "seeds": len(got)}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single seed)."""
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def dumps(obj: Any, **kw) -> str:
    return json.dumps(obj, default=_jsonable, **kw)


def _metric_key(k: str) -> str:
    return re.sub(r"[^\w./\- ]", "_", k)  # what MLflow accepts in a metric name


def write_partial(ctx: Context, result: dict, body: str, progress: str) -> None:
    """The table so far of a suite still running (no MLflow run): ``finish`` overwrites it."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    note = f"**Partial: {progress} finished; the suite is still running or was stopped.**"
    (ctx.out / f"{ctx.suite}.md").write_text(f"# nmoe bench {ctx.suite}\n\n{note}\n\n{body}")
    (ctx.out / f"{ctx.suite}.json").write_text(
        dumps({"suite": ctx.suite, "quick": ctx.quick, "partial": progress, **result}, indent=2)
    )


def finish(ctx: Context, result: dict, body: str, metrics: dict[str, float]) -> dict:
    """Write ``<suite>.md`` / ``<suite>.json`` and log the numbers (and any ``figures`` the result
    names) to MLflow; returns the JSON."""
    m = machine(ctx.devices)
    result = {"suite": ctx.suite, "quick": ctx.quick, **result, "machine": m}
    title = f"# nmoe bench {ctx.suite}" + (
        " (--quick: tiny configs; the numbers show the machinery, not the method's quality)" if ctx.quick else ""
    )
    md = f"{title}\n\n{machine_line(m)}\n\n{body}"
    ctx.out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = ctx.out / f"{ctx.suite}.md", ctx.out / f"{ctx.suite}.json"
    tracker = None
    if ctx.tracking_uri:
        from actors import tracking

        uri = ctx.tracking_uri
        root = (
            Path(uri[len("sqlite:///") :]).parent / "mlartifacts"
            if uri.startswith("sqlite:///")
            else Path("mlartifacts")
        )
        params = {
            "suite": ctx.suite,
            "quick": ctx.quick,
            "config": ctx.config or "",
            "overrides": " ".join(ctx.overrides),
            **{f"machine.{k}": v for k, v in m.items()},
        }
        run_id = tracking.start_run(uri, EXPERIMENT, f"{ctx.suite}-{time.strftime('%Y%m%d-%H%M%S')}", params, root)
        tracker = tracking.Tracker(uri, run_id)
        tracker.log({_metric_key(k): float(v) for k, v in metrics.items() if v is not None})
        result["mlflow_run_id"] = run_id
    result["files"] = {"markdown": str(md_path), "json": str(json_path)}
    md_path.write_text(md)
    json_path.write_text(dumps(result, indent=2))
    if tracker is not None:
        tracker.artifacts([md_path, json_path, *map(Path, result.get("figures", []))], "bench")
        tracker.finish()
    say(
        f"{ctx.suite}: wrote {md_path} and {json_path}" + (f"; mlflow run {result['mlflow_run_id']}" if tracker else "")
    )
    return result
