"""FullGate (ablation): the whole gate is FedAvg-ed every round, as plain FedAvg would."""

from __future__ import annotations

from training.gates.base import GateVariant
from training.registry import GATES


@GATES.register("fullgate")
class FullGate(GateVariant):
    describe = "whole gate, up and down"
    bytes_formula = "rounds × 2N × gate"
    reveals = "gate updates"
    sync = "whole"
