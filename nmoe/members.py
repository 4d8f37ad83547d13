"""``nmoe join`` and ``nmoe leave``: a device joins a trained network with its own data, or leaves it.

Both change the run folder (``training.membership``), record the change in MLflow, and a ``nmoe serve`` running on
the run takes it live within a second or two.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from nmoe.common import UserError

console = Console(stderr=True, soft_wrap=True, highlight=False)


def add_parsers(sub) -> None:
    j = sub.add_parser("join", help="a device joins a trained network with its own data (no retraining)")
    j.add_argument("--run", required=True, help="run folder written by nmoe train")
    j.add_argument("--data", default=None, metavar="FILE.npz", help="the device's data: an arrays file (x_train, ...)")
    j.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="data.KEY=VALUE",
        help="the device's data as any source, e.g. data.name=image_folder data.path=DIR",
    )
    j.add_argument(
        "--variant",
        action="append",
        default=[],
        help="a gate variant whose routing must take the device in (default: every trained one that can)",
    )
    _tracking(j)
    j.set_defaults(func=join_cmd)

    leave = sub.add_parser("leave", help="a client leaves a trained network: its statistics and expert go")
    leave.add_argument("--run", required=True, help="run folder written by nmoe train")
    leave.add_argument("--client", type=int, required=True, help="the member that leaves")
    _tracking(leave)
    leave.set_defaults(func=leave_cmd)


def _tracking(p) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow store of the run (default: its config's)")
    p.add_argument("--no-tracking", action="store_true", help="do not record the change in MLflow")


def _data_config(args, run: Path):
    """The device's own ``data`` section: ``--data`` (an arrays file) or ``--set data.*`` on the defaults."""
    from training.config import ConfigError, apply_overrides, from_dict

    bad = [o for o in args.overrides if not o.startswith("data.")]
    if bad:
        raise UserError(f"--set {bad[0]}: only the device's data (data.*) can be set on a join")
    if not args.data and not args.overrides:
        raise UserError("the device's data: give --data FILE.npz, or --set data.name=... data.path=...")
    if args.data and not Path(args.data).is_file():
        raise UserError(f"--data {args.data}: no such file")
    data = {"data": {"name": "arrays", "path": str(Path(args.data).resolve())}} if args.data else {}
    try:
        return from_dict(apply_overrides(data, args.overrides)).data
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def _run(args):
    from training import checkpoint as ckpt

    try:
        return ckpt.load_run_config(Path(args.run))
    except ckpt.RunFolderError as exc:
        raise UserError(str(exc)) from None


def join_cmd(args) -> int:
    from training import gates, membership
    from training.checkpoint import RunFolderError

    cfg = _run(args)
    run = Path(args.run)
    _, no = membership.joinable(cfg)
    unknown = [v for v in args.variant if v not in cfg.stage3.variants]
    if unknown:
        raise UserError(f"--variant {unknown[0]}: not trained in {run} (trained: {', '.join(cfg.stage3.variants)})")
    for v in args.variant:
        if not gates.get(v).can_join:
            raise UserError(membership.refusal(v, run))
    data = _data_config(args, run)
    try:
        record = membership.join(run, data, _say)
    except (membership.MembershipError, RunFolderError) as exc:
        raise UserError(str(exc)) from None
    i = record["client"]
    console.print(
        f"client {i} joined {run} in {record['seconds']:.1f} s (statistics up and routing down: "
        f"{record['network_seconds']:.2f} s); {record['members']} members now"
    )
    console.print(
        f"  bytes: statistics up {record['bytes_up']:,}, routing down {record['bytes_down']:,} (to every member), "
        f"F down once {record['bytes_f']:,}; its raw data stayed where it was"
    )
    acc = record["test_accuracy"]
    console.print(
        f"  on its own test data ({record.get('train_samples', 0)} train samples): "
        + ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items())
    )
    console.print(f"  routing updated: {', '.join(record['variants'])}")
    if no:
        console.print(
            f"  not updated: {', '.join(no)} (a trained head with one output per expert); they route among the "
            f"members they were trained with. nmoe join --variant {no[0]} says why and what would"
        )
    _record(args, cfg, run, record)
    return 0


def leave_cmd(args) -> int:
    from training import membership
    from training.checkpoint import RunFolderError

    cfg = _run(args)
    run = Path(args.run)
    try:
        record = membership.leave(run, args.client, _say)
    except (membership.MembershipError, RunFolderError) as exc:
        raise UserError(str(exc)) from None
    console.print(
        f"client {args.client} left {run} in {record['seconds']:.1f} s; {record['members']} members now. Its share "
        f"of the pooled statistics is gone and nobody routes to its expert; routing down {record['bytes_down']:,} "
        f"bytes. Not undone: {membership.CANNOT_UNDO}."
    )
    _record(args, cfg, run, record)
    return 0


def _say(message: str) -> None:
    console.print(f"[{time.strftime('%H:%M:%S')}] {message}")


def _record(args, cfg, run: Path, record: dict) -> None:
    """The change in the run's MLflow record: metrics at step = the membership version, and the files it changed
    (``state.json``, ``results.json``, the change's checkpoint), so that a run served from MLflow is the run now."""
    from actors import tracking
    from training import checkpoint as ckpt

    run_id = ckpt.load_state(run).get("mlflow_run_id")
    if args.no_tracking or not run_id or not cfg.tracking.enabled:
        return
    tracker = tracking.Tracker(tracking.resolve_uri(args.tracking_uri or cfg.tracking.tracking_uri), run_id)
    keys = ("members", "seconds", "network_seconds", "bytes_up", "bytes_down", "bytes_f")
    tracker.log({f"membership/{k}": record[k] for k in keys}, step=record["version"])
    tracker.artifacts([ckpt.membership_file(run, record["version"])], "checkpoints/membership")
    tracker.artifacts([run / "state.json", run / "results.json"])
    console.print(f"  recorded in MLflow run {run_id}")
