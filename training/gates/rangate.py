"""RanGate: k distinct experts per input uniformly at random, equal weights; the lower bound.

Nothing is trained and nothing travels before inference (our reading of the paper's baseline).
The draws are seeded by the client's routing seed, so actors and Serve route alike.
"""

from __future__ import annotations

import torch

from training import routing
from training.gates.base import GateVariant
from training.registry import GATES


@GATES.register("rangate")
class RanGate(GateVariant):
    describe = "nothing (untrained)"
    bytes_formula = "0"
    reveals = "nothing"
    trains = False
    needs_answers = False
    has_gate = False
    can_join = True  # it draws among whichever experts are members

    def regate(self, state, shared, num_experts):
        return None

    def make_gate(self, cfg, num_classes: int) -> None:
        return None

    def choose(self, gate, h, k, available, num_experts, seed):
        gen = torch.Generator().manual_seed(seed)
        return routing.random_routing(len(h), num_experts, k, gen, available=available, device=h.device)
