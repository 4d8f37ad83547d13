"""``nmoe bench <suite>``: parse the flags and run one benchmark suite from ``benchmarks/``."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

from nmoe.common import UserError, config_args

SUITES = ("accuracy", "overhead", "comm", "scaling", "serve", "classgate", "models", "datasets", "gpu", "membership")
IN_PROCESS = ("models",)  # suites that start no Ray
# benchmarks/serve.py would shadow the serve package for scripts in benchmarks/
MODULES = {"serve": "serving", "classgate": "classgate_sweep"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: " + ", ".join(SUITES) + " (tables under --out)",
    )
    p.add_argument("suite", choices=SUITES, help="which benchmark to run")
    p.add_argument("--quick", action="store_true", help="tiny configs (configs/smoke.yaml-sized): minutes, not hours")
    p.add_argument(
        "--json", action="store_true", help="print exactly one JSON object on stdout (the rest goes to stderr)"
    )
    p.add_argument(
        "--out",
        default="benchmarks/results",
        help="where <suite>.md/.json and the runs go (default: benchmarks/results under the working directory)",
    )
    config_args(p)
    p.add_argument("--address", default=None, help="join a running Ray cluster; default: local Ray on 127.0.0.1")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: the config's, sqlite:///mlflow.db)"
    )
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="retrain even where a finished run with the same config exists under OUT/runs",
    )
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="accuracy, classgate: tabulate the runs already finished under OUT/runs, train nothing",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="overhead: torch threads of the in-process path (default: every core)"
    )
    p.add_argument(
        "--run", default=None, help="serve, classgate, membership: benchmark this finished run instead of training one"
    )
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="serve: requests per (batch, concurrency) cell (default 200; 16 with --quick)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from actors import tracking
    from actors.cluster import ClusterError, connect
    from benchmarks import common
    from training.checkpoint import RunFolderError

    if args.threads is not None and args.threads < 1:
        raise UserError("--threads: must be >= 1")
    if args.requests is not None and args.requests < 1:
        raise UserError("--requests: must be >= 1")
    if args.run and not (Path(args.run) / "state.json").is_file():
        raise UserError(f"--run {args.run}: not an NMoE run folder (train one with nmoe train --out DIR)")
    ctx = common.Context(
        suite=args.suite,
        quick=args.quick,
        out=Path(args.out).resolve(),
        config=args.config,
        overrides=list(args.overrides),
        fresh=args.fresh,
        finished_only=args.finished_only,
        threads=args.threads,
        run=args.run,
        requests=args.requests,
    )
    base = ctx.cfg()  # fail early on a bad config
    if not args.no_tracking and base.tracking.enabled:
        ctx.tracking_uri = tracking.resolve_uri(args.tracking_uri or base.tracking.tracking_uri)
    try:
        if args.suite not in IN_PROCESS:
            connect(args.address or base.cluster.address)
    except ClusterError as exc:
        raise UserError(str(exc)) from None
    suite = importlib.import_module(f"benchmarks.{MODULES.get(args.suite, args.suite)}")
    # with --json, stray prints of libraries go to stderr: stdout carries one JSON object
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        try:
            result, body, metrics = suite.run(ctx)
        except RunFolderError as exc:
            raise UserError(str(exc)) from None
        result = common.finish(ctx, result, body, metrics)
    if args.json:
        print(common.dumps(result))
    else:
        print(Path(result["files"]["markdown"]).read_text())
    return 0
