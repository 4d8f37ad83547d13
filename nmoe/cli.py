"""``nmoe``: train, serve, predict and inspect a Networked Mixture-of-Experts.

Every user error (bad config, missing data, bad flag value) ends as one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console
from rich.table import Table

from nmoe import bench, members, reference, serve_cmd, train
from nmoe.common import UserError, config_args, load_config

console = Console(stderr=True, soft_wrap=True)


def cmd_data_summary(args) -> int:
    from training.data import build_split, label_counts, label_entropy
    from training.datasets import load_labels

    cfg = load_config(args)
    ds = load_labels(cfg.data)
    split = build_split(cfg, ds.y_train, ds.y_test, ds.num_classes, ds.client_train)
    clients = []
    for i, (tr, te, va) in enumerate(zip(split.train, split.test, split.val)):
        counts = label_counts(ds.y_train[tr], ds.num_classes)
        clients.append(
            {
                "id": i,
                "train_samples": int(len(tr)),
                "test_samples": int(len(te)),
                "val_samples": int(len(va)),
                "label_counts": counts.tolist(),
                "label_entropy": round(label_entropy(counts), 4),
            }
        )
    total = sum(c["train_samples"] for c in clients)
    if args.json:
        print(
            json.dumps(
                {
                    "dataset": ds.name,
                    "num_classes": ds.num_classes,
                    "clients": clients,
                    "total_train": total,
                    "global_test": int(len(split.global_test)),
                    "global_val": int(len(split.global_val)),
                }
            )
        )
        return 0
    table = Table(title=f"{ds.name}: {cfg.partition.method} partition over {cfg.num_clients} clients")
    for col in ("client", "train", "val", "test", "entropy", "label histogram"):
        table.add_column(col, justify="right" if col != "label histogram" else "left")
    for c in clients:
        table.add_row(
            str(c["id"]),
            str(c["train_samples"]),
            str(c["val_samples"]),
            str(c["test_samples"]),
            f"{c['label_entropy']:.2f}",
            " ".join(str(n) for n in c["label_counts"]),
        )
    Console().print(table)
    Console().print(
        f"total train samples: {total}; global validation half: {len(split.global_val)}; "
        f"global test half: {len(split.global_test)} (disjoint)"
    )
    return 0


def gate_rows() -> list[list[str]]:
    """One row per registered gate variant: name, what it needs, how it syncs, what travels."""
    from training.registry import GATES

    rows = []
    for name in GATES.names():
        v = GATES.get(name)
        needs = ", ".join(n for n, on in (("expert answers", v.needs_answers), ("one-off exchange", v.exchanges)) if on)
        sync = {"prefix": "FedAvg of " + ", ".join(f"`{p}*`" for p in v.prefixes)}.get(v.sync, v.sync)
        rows.append(
            [
                f"`{name}`",
                "yes" if v.trains else "no",
                needs or "nothing",
                sync if v.trains else "—",
                v.describe,
                v.bytes_formula or "—",
                v.reveals or "—",
                "yes" if v.can_join else "no",
                f"`{v.__module__}`",
            ]
        )
    return rows


GATE_COLUMNS = [
    "variant",
    "trains",
    "needs before training",
    "gate sync each round",
    "what travels",
    "stage-3 bytes",
    "what it reveals",
    "joins and leaves untrained",
    "module",
]


def gates_markdown() -> str:
    """The registered gate variants as a markdown table (``nmoe gates --markdown``, the docs' concepts page)."""
    head = "| " + " | ".join(GATE_COLUMNS) + " |\n|" + "---|" * len(GATE_COLUMNS)
    return head + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in gate_rows())


def cmd_gates(args) -> int:
    from training.registry import OBJECTIVES

    load_config(args)  # imports the config's plugins
    rows = gate_rows()
    if args.markdown:
        print(gates_markdown())
        return 0
    table = Table(title="gate variants (stage3.variants); --markdown for bytes and what each reveals")
    keep = [0, 1, 2, 3, 4, 7, 8]
    for i in keep:
        table.add_column(GATE_COLUMNS[i])
    for r in rows:
        table.add_row(*(r[i].replace("`", "") for i in keep))
    Console().print(table)
    Console().print(
        "stage-1 objectives (stage1.method): "
        + ", ".join(f"{n} (federates {', '.join(OBJECTIVES.get(n).prefixes)})" for n in OBJECTIVES.names())
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect datasets and partitions")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    summary = data_sub.add_parser("summary", help="per-client partition: samples, label histogram, entropy")
    config_args(summary)
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    summary.set_defaults(func=cmd_data_summary)

    gates = sub.add_parser("gates", help="the registered stage-3 gate variants and stage-1 objectives")
    config_args(gates)  # its plugins are listed too
    gates.add_argument("--markdown", action="store_true", help="print the README's table of gate variants")
    gates.set_defaults(func=cmd_gates)

    reference.add_parsers(sub)
    train.add_parser(sub)
    serve_cmd.add_parsers(sub)
    members.add_parsers(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from training.config import ConfigError
    from training.datasets import DataError

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback unless told otherwise
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ConfigError, DataError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
