"""Stage-3 gate variants: one module each, registered by name in ``training.registry.GATES``.

``get(name)`` returns a fresh instance (a variant may keep a client's state, e.g. ProtoGate's
synthetic latents). See ``base.GateVariant`` for the interface and the README's
"Add a gate in one file" for a complete example.
"""

import importlib

from training.gates.base import ClientView, GateVariant, payload_bytes
from training.registry import GATES

BUILTINS = ("rangate", "rollgate", "fedgate", "localgate", "fullgate", "protogate", "classgate")
for _module in BUILTINS:  # registration order is listing order: the paper's, the ablations, this project's
    importlib.import_module(f"training.gates.{_module}")


def get(name: str) -> GateVariant:
    return GATES.get(name)()


def names() -> list[str]:
    return GATES.names()


__all__ = ["ClientView", "GateVariant", "GATES", "get", "names", "payload_bytes"]
