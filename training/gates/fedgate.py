"""FedGate (the paper's proposal): partially synchronised gates.

Every round each client trains its gate on the experts' cached answers; the coordinator
FedAvg-s the gate's ``body`` (the shared representation of "which expert knows this") and
each client keeps its ``head`` (its personal routing) local.
"""

from __future__ import annotations

from training.gates.base import GateVariant
from training.registry import GATES


@GATES.register("fedgate")
class FedGate(GateVariant):
    describe = "gate body, up and down"
    bytes_formula = "rounds × 2N × body"
    reveals = "gate updates"
    sync = "prefix"
    prefixes = ("body.",)
