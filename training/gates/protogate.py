"""ProtoGate (this project's): FedGate that also trains on the rest of the network's inputs.

Once before its rounds each client sends per-class latent prototypes (count, mean, std per
class, see ``training.prototypes``), receives everyone's, draws synthetic latents from its
peers' class Gaussians and asks every expert about them. Its gate then trains on its own
latents plus the synthetic ones, so it learns where inputs unlike its own should go, instead
of learning to keep everything local. The body is synchronised like FedGate's.
"""

from __future__ import annotations

import torch

from training import prototypes, seeds
from training.gates.base import ClientView
from training.gates.fedgate import FedGate
from training.registry import GATES


@GATES.register("protogate")
class ProtoGate(FedGate):
    describe = "gate body; once: class prototypes, answers on drawn latents"
    bytes_formula = "N × C(8 + 8d) × (1 + N) + answers on the drawn latents + FedGate's"
    reveals = "each client's label histogram and a per-class average of its latent features"
    exchanges = True

    def __init__(self) -> None:
        self._data: tuple | None = None  # (latents, labels, answers) incl. the synthetic ones

    def check_config(self, cfg) -> list[tuple[str, str]]:
        return [] if cfg.stage3.proto_ratio >= 0 else [("stage3.proto_ratio", "must be >= 0")]

    def client_stats(self, client: ClientView) -> dict:
        return prototypes.class_stats(client.latents(), client.y, client.num_classes)

    def install(self, client: ClientView, gate, shared: dict[int, dict]):
        """Synthetic latents from the peers' prototypes, and every expert's answers on them."""
        gen = torch.Generator().manual_seed(seeds.synthetic(client.cfg.seed, client.id))
        peers = [j for j in shared if j != client.id]
        n_each = int(client.cfg.stage3.proto_ratio * len(client.y) / max(1, len(peers)))
        drawn = [prototypes.sample_latents(shared[j], n_each, gen) for j in peers]
        h = torch.cat([client.latents(), *(d[0] for d in drawn)])
        y = torch.cat([client.y, *(d[1] for d in drawn)])
        answers, cost = client.ask_experts(h)
        self._data = (h, y, answers)
        return cost

    def training_data(self, client: ClientView):
        # None after a restart that lost the install: the own data only
        return self._data if self._data is not None else super().training_data(client)
