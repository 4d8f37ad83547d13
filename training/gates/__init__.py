"""Stage-3 gate variants: one module each, registered by name in ``training.registry.GATES``.

``get(name)`` returns a fresh instance (a variant may keep a client's state, e.g. ProtoGate's
synthetic latents). See ``base.GateVariant`` for the interface and the README's
"Add a gate in one file" for a complete example.
"""

from training.gates import classgate, fedgate, fullgate, localgate, protogate, rangate, rollgate  # noqa: F401
from training.gates.base import ClientView, GateVariant, payload_bytes
from training.registry import GATES


def get(name: str) -> GateVariant:
    return GATES.get(name)()


def names() -> list[str]:
    return GATES.names()


__all__ = ["ClientView", "GateVariant", "GATES", "get", "names", "payload_bytes"]
