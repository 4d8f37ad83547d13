"""RollGate: one gate rolled around the clients in a ring, each training it in turn.

Every client ends with the same gate (our reading). The coordinator hands the gate from
client to client (``sync = "ring"``) and finally gives every client the last one.
"""

from __future__ import annotations

from training.gates.base import GateVariant
from training.registry import GATES


@GATES.register("rollgate")
class RollGate(GateVariant):
    describe = "one gate around the ring"
    bytes_formula = "rounds × N × gate + N × gate"
    reveals = "gate updates"
    sync = "ring"
