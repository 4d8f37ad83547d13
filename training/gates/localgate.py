"""LocalGate (ablation): each client trains its own gate on its own data; nothing is synchronised."""

from __future__ import annotations

from training.gates.base import GateVariant
from training.registry import GATES


@GATES.register("localgate")
class LocalGate(GateVariant):
    describe = "nothing (no sync)"
    bytes_formula = "0"
    reveals = "nothing"
    sync = "none"
