"""``nmoe train``: run the three-stage schedule on Ray with a live progress display."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from nmoe.common import UserError, config_args, load_config

STOP_CHOICES = ("stage1", "stage2", "stage3")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an NMoE: stage 1 (F), stage 2 (experts), stage 3 (gates), evaluation")
    config_args(p)
    p.add_argument(
        "--address", default=None, help="join a running Ray cluster (e.g. auto); default: local Ray on 127.0.0.1"
    )
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument(
        "--resume", default=None, metavar="DIR", help="continue the run in DIR without redoing finished stages"
    )
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: the config's, sqlite:///mlflow.db)"
    )
    p.add_argument("--stop-after", choices=STOP_CHOICES, default=None, help="stop after this stage (resume later)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=run)


def _prepare(args):
    """The config, run folder and whether this continues an earlier run; refuses to mix runs."""
    from training import checkpoint as ckpt
    from training.config import absolute_paths

    if args.resume:
        if args.config or args.overrides:
            raise UserError("--resume continues a run with its own config; drop --config/--set")
        out = Path(args.resume)
        try:
            return ckpt.load_run_config(out), out, True
        except ckpt.RunFolderError as exc:
            raise UserError(str(exc)) from None
    cfg = absolute_paths(load_config(args))  # actors may run in another directory
    out = Path(args.out or Path("runs") / cfg.name)
    if (out / "state.json").exists():
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")
    _check_data(cfg)
    return cfg, out, False


def _check_data(cfg) -> None:
    """Refuse, before Ray starts, a config the data or the models cannot satisfy (``DataError`` or
    ``ConfigError`` names why): every input is read once and checked, the split is drawn, and F and E are built and
    run once on the input's shape."""
    from training.config import ConfigError
    from training.data import build_split
    from training.datasets import check_data
    from training.federated import batchnorm_keys
    from training.models import check_models

    labels = check_data(cfg.data)
    build_split(cfg, labels.y_train, labels.y_test, labels.num_classes, labels.client_train)
    model = check_models(cfg.model, labels.input_shape, labels.num_classes)
    if cfg.stage1.fedbn and not batchnorm_keys(model.extractor):
        raise ConfigError(f"stage1.fedbn: model.extractor {cfg.model.extractor} has no BatchNorm layer to keep local")


def run(args) -> int:
    started = time.time()  # setup counts from here: imports, the data check, Ray, MLflow, the clients
    import ray

    from actors import mps, tracking
    from actors.cluster import ClusterError, connect
    from actors.coordinator import Coordinator
    from actors.placement import PlacementError, client_device
    from actors.plots import make_plots
    from training import checkpoint as ckpt
    from training import schema
    from training.data import build_split
    from training.datasets import load_labels

    cfg, out, resume = _prepare(args)
    console = Console(soft_wrap=True)
    with ThreadPoolExecutor(1) as pool:
        opening = pool.submit(_open_tracking, args, cfg, out, resume)  # MLflow's store opens while Ray starts
        try:
            ours = connect(args.address or cfg.cluster.address)
            device = client_device(cfg)  # cluster.device=cuda on a cluster without GPUs: refused before anything starts
            # cluster.mps on the local cluster started here; a cluster joined by --address has cluster.yaml's daemon
            local_mps = cfg.cluster.mps and device == "cuda" and ours and mps.start()
        except (ClusterError, PlacementError, mps.MPSError) as exc:
            tracking.Tracker(*opening.result()).finish("FAILED")
            raise UserError(str(exc)) from None
        uri, run_id = opening.result()
    fresh = not resume and not out.exists()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    coord = (
        ray.remote(Coordinator)
        .options(num_cpus=0, max_concurrency=4, scheduling_strategy=here)
        .remote(cfg.to_dict(), str(out.resolve()), uri, run_id, resume)
    )  # on the driver's node: losing a worker can't take it
    pending = coord.run.remote(args.stop_after, started)
    resumable = f"continue with: nmoe train --resume {out}"
    try:
        results = _follow(coord, pending, console)
        ended = time.perf_counter()  # the schedule is over: what follows is teardown
    except KeyboardInterrupt:
        tracking.Tracker(uri, run_id).finish("KILLED")
        if (out / "state.json").exists():
            console.print(resumable)
        raise
    except ray.exceptions.RayError as exc:
        tracking.Tracker(uri, run_id).finish("FAILED")
        cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, Exception) else exc
        if fresh and not (out / "state.json").exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing a later --resume could trust
        if isinstance(cause, (PlacementError, ckpt.RunFolderError)):
            raise UserError(str(cause)) from None
        if isinstance(cause, ray.exceptions.RayActorError):
            what = "the coordinator died (killed, out of memory, or its node was lost)"
        else:
            what = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[-1]}"
        hint = resumable if (out / "state.json").exists() else "nothing was finished; run it again"
        raise UserError(f"training stopped: {what}; {hint}") from None
    finally:
        try:
            ray.get(coord.shutdown.remote(), timeout=60)
        except ray.exceptions.RayError:  # GetTimeoutError included: the coordinator goes with the driver
            ray.kill(coord)
        if local_mps:
            mps.stop()
    tracker = tracking.Tracker(uri, run_id)
    if "stopped_after" in results:
        console.print(f"stopped after {results['stopped_after']}; continue with: nmoe train --resume {out}")
        return 0
    plots = make_plots(results, out)
    if tracker.client is not None:
        labels = load_labels(cfg.data)
        split = build_split(cfg, labels.y_train, labels.y_test, labels.num_classes, labels.client_train)
        tracker.inputs(cfg, labels, split)
        tracker.table(results["methods"])
    tracker.artifacts([out / "config.yaml", out / "state.json"])
    tracker.artifacts([out / "checkpoints"], "checkpoints")
    tracker.artifacts(plots, "plots")
    if ours:
        ray.shutdown()
    results["timings"]["teardown"] = time.perf_counter() - ended
    schema.add_total(results["timings"])
    ckpt.save_json(out / "results.json", results)
    tracker.artifacts([out / "results.json"])
    tracker.finish()
    print_results(results, console)
    console.print(f"results: {out / 'results.json'}" + (f"   mlflow run: {run_id}" if run_id else ""))
    return 0


def _open_tracking(args, cfg, out: Path, resume: bool) -> tuple[str | None, str | None]:
    """``(tracking URI, MLflow run id)``: the run's own on ``--resume``, else a new one; ``(None, None)`` untracked."""
    from actors import tracking
    from training import checkpoint as ckpt

    if not cfg.tracking.enabled or args.no_tracking:
        return None, None
    uri = tracking.resolve_uri(args.tracking_uri or cfg.tracking.tracking_uri)
    run_id = ckpt.load_state(out).get("mlflow_run_id") if resume else None
    if run_id is None:
        run_id = tracking.start_run(
            uri,
            cfg.tracking.experiment,
            f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            cfg.flat(),
            Path("mlartifacts"),
            tracking.run_tags(cfg),
        )
    return uri, run_id


def _follow(coord, pending, console: Console) -> dict:
    """Poll the coordinator's progress while its schedule runs: bars on a terminal, lines in a log."""
    import ray

    bars: dict[str, int] = {}
    last = None
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<44}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        while True:
            done, _ = ray.wait([pending], timeout=0.5)
            try:
                p = ray.get(coord.progress.remote(), timeout=5)
            except ray.exceptions.RayError:
                p = None
            if p and p["message"] != last and not console.is_terminal:
                console.print(f"[{time.strftime('%H:%M:%S')}] {p['stage']}: {p['message']}", highlight=False)
            last = p["message"] if p else last
            if p and p["stage"] != "done":
                if p["stage"] not in bars:
                    for t in bars.values():
                        progress.update(t, completed=progress.tasks[t].total or 1, total=progress.tasks[t].total or 1)
                    bars[p["stage"]] = progress.add_task(p["message"], total=p["rounds"] or None)
                progress.update(
                    bars[p["stage"]], description=p["message"], completed=p["round"], total=p["rounds"] or None
                )
            if done:
                for t in bars.values():
                    progress.update(t, completed=progress.tasks[t].total or 1, total=progress.tasks[t].total or 1)
                return ray.get(pending)


def print_results(results, console: Console) -> None:
    """The table ``nmoe train`` ends with (``results``: a ``training.schema.Results``)."""
    table = Table(title="NMoE: accuracy per method (personalized = own test split, global = balanced test half)")
    for col in ("method", "personalized", "global"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, m in results["methods"].items():
        table.add_row(name, f"{100 * m['personalized_acc']:.1f}", f"{100 * m['global_acc']:.1f}")
    console.print(table)
    for name, chosen in results.get("selection", {}).items():
        console.print(
            f"{name}: personal={chosen['personal']:g}, chosen on validation (frontier.png beside results.json)"
        )
    b, t = results["bytes"], results["timings"]
    console.print(
        f"bytes: stage1 {b['stage1']:,}  stage2 0  stage3 {b['stage3']:,}  "
        f"per routed sample {b['per_routed_sample']:.0f} (raw input {b['raw_input_per_sample']:,})"
    )
    console.print("seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in t.items()))
    if results["missing_clients"]:
        console.print(f"missing clients: {results['missing_clients']}")
