"""``nmoe config``, ``nmoe models`` and ``nmoe datasets``: the configuration reference, generated from the typed
config (so it cannot drift from it), and the registered feature extractors, experts and datasets."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from nmoe.common import config_args, load_config

FIELD = re.compile(r"^\s+(\w+): [^=]+?(?:= .*?)?(?:\s+# (.*))?$")


def _comments(cls: type) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the dataclass's source: its description."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = FIELD.match(line)
        if m and m.group(2):
            out[m.group(1)] = m.group(2).strip()
    return out


def _type(tp) -> str:
    return re.sub(r"\b(typing|training\.config)\.", "", str(tp)).replace("<class '", "").replace("'>", "")


def config_rows(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` of every field of the typed config, sections flattened."""
    from training.config import ExperimentConfig

    cls = cls or ExperimentConfig
    hints, notes, rows = typing.get_type_hints(cls), _comments(cls), []
    default = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += config_rows(hints[f.name], f"{prefix}{f.name}.")
            continue
        value = getattr(default, f.name)
        rows.append((f"{prefix}{f.name}", _type(hints[f.name]), repr(value), notes.get(f.name, "")))
    return rows


def config_markdown() -> str:
    """Every config field as a markdown table: key, type, default, meaning (the docs' configuration reference)."""
    escape = str.maketrans({"|": "\\|"})  # a pipe inside a cell would end it
    rows = (f"| `{k}` | {t} | `{d}` | {m.translate(escape)} |" for k, t, d, m in config_rows())
    return "| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(rows)


def cmd_config(args) -> int:
    print(config_markdown())
    return 0


def listing(registries: tuple) -> str:
    """One row per registered plug-in: the config key that names it, its name, its docstring's first paragraph."""
    rows = ["| key | name | what it is |", "|---|---|---|"]
    for key, registry in registries:
        for name in registry.names():
            doc = (inspect.getdoc(registry.get(name)) or "").split("\n\n")[0].replace("\n", " ")
            rows.append(f"| `{key}` | `{name}` | {doc} |")
    return "\n".join(rows)


def models_markdown() -> str:
    from training.registry import EXPERTS, EXTRACTORS

    return listing((("model.extractor", EXTRACTORS), ("model.expert", EXPERTS)))


def datasets_markdown() -> str:
    from training.registry import DATASETS

    return listing((("data.name", DATASETS),))


def cmd_models(args) -> int:
    load_config(args)  # imports the config's plugins
    print(models_markdown())
    return 0


def cmd_datasets(args) -> int:
    load_config(args)
    print(datasets_markdown())
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("config", help="the configuration reference: every field, its type, default and meaning")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("models", help="the registered feature extractors (model.extractor) and experts (model.expert)")
    config_args(p)  # its plugins are listed too
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("datasets", help="the registered datasets (data.name): built-ins, general loaders, plug-ins")
    config_args(p)
    p.set_defaults(func=cmd_datasets)
