"""Registries of plug-ins by name: stage-3 gate variants, stage-1 objectives, feature extractors, experts, datasets.

A plug-in is a class (or, for models, a factory) registered under a name (``@GATES.register("mygate")``).
A model or a dataset may also be named by where it lives, ``"package.module:Name"`` or ``"path/to/file.py:Name"``
(``Registry.resolve``), with no registration at all. Built-ins
register when ``training`` is imported; a user's own plug-ins are Python files or modules
named in the config's ``plugins`` list, imported by ``load_plugins`` in every process that
reads the config (driver, coordinator, clients, Serve replicas), so they need no project edit.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class PluginError(ValueError):
    """A plug-in could not be found, imported or registered; the message says which."""


class Registry(Generic[T]):
    """Name -> class, in registration order (built-ins first)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            old = self._items.get(name)
            if old is not None and _origin(old) != _origin(cls):
                raise PluginError(f"{self.kind} {name!r}: already registered by {old.__module__}.{old.__qualname__}")
            cls.name = name
            self._items[name] = cls
            return cls

        return add

    def get(self, name: str) -> type[T]:
        if name not in self._items:
            raise PluginError(f"unknown {self.kind} {name!r} (one of {', '.join(self._items)})")
        return self._items[name]

    def resolve(self, spec: str) -> type[T]:
        """A registered name, or ``"package.module:Name"`` / ``"path/to/file.py:Name"`` imported on demand."""
        if ":" not in spec:
            return self.get(spec)
        where, _, attr = spec.rpartition(":")
        if not where or not attr.isidentifier():
            raise PluginError(f"{spec!r}: expected a registered {self.kind}, 'package.module:Name' or 'file.py:Name'")
        module = load_plugins([where])[0]
        if not hasattr(module, attr):
            raise PluginError(f"{where} has no {attr!r}")
        return getattr(module, attr)

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def _origin(cls: type) -> tuple[str, str]:
    """Where a class is defined: the same file imported twice (by path and by name) is one plug-in."""
    try:
        where = str(Path(inspect.getfile(cls)).resolve())
    except (TypeError, OSError):
        where = cls.__module__
    return where, cls.__qualname__


GATES: Registry = Registry("gate variant")
OBJECTIVES: Registry = Registry("stage-1 objective")
EXTRACTORS: Registry = Registry("feature extractor")
EXPERTS: Registry = Registry("expert")
DATASETS: Registry = Registry("dataset")

_loaded: dict[str, object] = {}


def load_plugins(specs: list[str]) -> list[object]:
    """Import each plug-in once: a ``.py`` file path, or a dotted module name on ``sys.path``; returns
    the modules."""
    for spec in specs:
        if spec in _loaded:
            continue
        try:
            if spec.endswith(".py"):
                path = Path(spec)
                if not path.is_file():
                    raise PluginError(f"plugins: {spec}: no such file")
                name = f"nmoe_plugin_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
                loader = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module
                loader.loader.exec_module(module)
            else:
                module = importlib.import_module(spec)
        except PluginError:
            raise
        except Exception as exc:  # noqa: BLE001 - any import failure is the plug-in's, reported by name
            raise PluginError(f"plugins: cannot import {spec}: {type(exc).__name__}: {exc}") from None
        _loaded[spec] = module
    return [_loaded[spec] for spec in specs]
