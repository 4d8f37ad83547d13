"""MkDocs hooks: the reference pages are generated from the code, so they cannot drift from it.

A page asks for a generated part with a marker on a line of its own:

- ``<!-- generated: config -->``: every field of the typed config (``nmoe config``);
- ``<!-- generated: gates -->``: the registered gate variants (``nmoe gates --markdown``);
- ``<!-- generated: models -->``, ``<!-- generated: datasets -->``: the registered extractors, experts and datasets;
- ``<!-- generated: cli -->``: every ``nmoe`` command and option, from the argparse parser;
- ``<!-- generated: http -->``: every HTTP operation, from the OpenAPI schema the index serves.

The figures under ``benchmarks/results/`` are published beside the results pages.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def on_files(files, config):
    """Each figure of ``benchmarks/results/`` at ``results/<name>.png``, beside the results pages (and the tables
    they include, which link their figures by name)."""
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        rel = png.relative_to(ROOT / "benchmarks").as_posix()
        files.append(File(rel, str(ROOT / "benchmarks"), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    for name, make in GENERATED.items():
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


def _config() -> str:
    from nmoe.reference import config_markdown

    return config_markdown()


def _gates() -> str:
    from nmoe.cli import gates_markdown

    return gates_markdown()


def _models() -> str:
    from nmoe.reference import models_markdown

    return models_markdown()


def _datasets() -> str:
    from nmoe.reference import datasets_markdown

    return datasets_markdown()


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _cli() -> str:
    """One section per command: what it does, its usage, and a table of its options."""
    from nmoe.cli import build_parser

    out = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for sub, child in subs[0].choices.items():
                walk(child, f"{name} {sub}")
            return
        usage = " ".join(parser.format_usage().split())[len("usage: ") :]
        out.extend([f"## `{name}`", "", _cell(parser.description), "", f"```text\n{usage}\n```", ""])
        rows = [
            f"| `{', '.join(a.option_strings) or a.dest}` | {_cell(a.help)} | "
            f"{'' if a.default in (None, argparse.SUPPRESS) else f'`{a.default}`'} |"
            for a in parser._actions
            if not isinstance(a, argparse._HelpAction)
        ]
        if rows:
            out.extend(["| option | meaning | default |", "|---|---|---|", *rows, ""])

    walk(build_parser(), "nmoe")
    return "\n".join(out)


# what the HTTP reference documents: the default config's run (Fashion-MNIST, 10 clients), served with FedGate
_META = {
    "dataset": "fashion_mnist",
    "num_classes": 10,
    "input_shape": [1, 28, 28],
    "image": True,
    "clients": [{"label_counts": [0] * 10, "train_samples": 0}] * 10,
}


def _http() -> str:
    """Each operation of the index's OpenAPI schema: method, path, what it does, its bodies and answers."""
    from serve import api

    schema = api.index_app(_META, "fedgate", {}, dict, api.Tokens(None), 256, False).openapi()
    out = ["## Operations", "", "| operation | what it does | request bodies | answers |", "|---|---|---|---|"]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            bodies = ", ".join(f"`{k}`" for k in op.get("requestBody", {}).get("content", {}))
            answers = ", ".join(f"{code} {_cell(r.get('description'))}" for code, r in op.get("responses", {}).items())
            what = _cell(op.get("description") or op.get("summary"))
            out.append(f"| `{method.upper()} {path}` | {what} | {bodies or '—'} | {answers} |")
    out += ["", "## A prediction's reply", "", "| field | type | meaning |", "|---|---|---|"]
    for name, prop in schema["components"]["schemas"]["PredictResponse"]["properties"].items():
        kind = prop.get("type") or " or ".join(t.get("type", "?") for t in prop.get("anyOf", []))
        out.append(f"| `{name}` | {kind} | {_cell(prop.get('description'))} |")
    return "\n".join(out)


GENERATED = {"config": _config, "gates": _gates, "models": _models, "datasets": _datasets, "cli": _cli, "http": _http}
