"""What every ``nmoe`` command shares: the one-line ``UserError`` and the config arguments."""

from __future__ import annotations

import argparse


class UserError(Exception):
    """An error the user can fix; printed as one line."""


def config_args(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set`` on a subcommand."""
    p.add_argument("--config", default=None, help="YAML experiment config (default: configs/default.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. stage1.rounds=3",
    )


def load_config(args):
    """The config that ``--config`` and ``--set`` describe (``ConfigError`` names a bad field)."""
    from training.config import DEFAULT_CONFIG, load_config

    return load_config(args.config or DEFAULT_CONFIG, args.overrides)
