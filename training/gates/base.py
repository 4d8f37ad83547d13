"""The stage-3 interface: one ``GateVariant`` subclass per way of training and using gates.

In the spirit of Flower's ``Strategy``, a variant says only what is its own:

- ``make_gate``: the gate module each client holds (or None: RanGate has none);
- what it needs from the network before training: the experts' cached answers
  (``needs_answers``), a one-off exchange (``exchanges``: ``client_stats`` on each client,
  ``combine`` on the coordinator, ``install`` back on each client), or nothing;
- how the coordinator combines the clients' gates each round (``sync``): ``"none"``,
  ``"prefix"`` (FedAvg of the keys under ``prefixes``), ``"whole"`` (FedAvg of all) or
  ``"ring"`` (one gate passed around the clients);
- ``fit``: one client's round;
- ``choose`` and ``readout``: how routed inference picks experts and reads their answers;
- ``payload_bytes``: what its exchange costs on the wire;
- ``can_join`` and ``regate``: whether a trained network can take a member in (or give one back) without
  retraining, and how a member's saved gate takes the network's new shape (``training.membership``).

The actors and Serve drive any variant through this interface; a variant is pure torch and
sees a client only through a ``ClientView``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Optional

import torch
from torch import nn

from training import federated, local, routing
from training.models import Gate

Sync = Literal["none", "prefix", "whole", "ring"]
Cost = dict[str, int]  # {"bytes_out", "bytes_in"}: what a client sent and received


@dataclass
class ClientView:
    """What a variant sees of one client: its config, own data's latents and labels, its expert,
    which experts can answer, and the network only as "ask every expert about these latents"."""

    id: int
    cfg: Any  # training.config.ExperimentConfig
    num_classes: int
    latents: Callable[[], torch.Tensor]  # F(x) of the client's own train shard (cached)
    y: torch.Tensor
    expert: nn.Module
    answers: Callable[[], torch.Tensor]  # every expert on the own latents, [n, N, C] (fetched once)
    ask_experts: Callable[[torch.Tensor], tuple[torch.Tensor, Cost]]  # every expert on any latents
    available: Optional[torch.Tensor]  # bool [N], None: all

    @property
    def num_experts(self) -> int:
        return self.cfg.num_clients


def payload_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) dict, list or tuple."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


class GateVariant:
    """A stage-3 variant. Subclass it, set the class attributes, override what differs, and
    register it: ``@GATES.register("name")``. The defaults are a learned gate trained locally
    on the cached expert answers, never synchronised (LocalGate)."""

    name: ClassVar[str] = ""  # set by the registry
    describe: ClassVar[str] = ""  # what travels, in a few words (the comm table, ``nmoe gates``)
    bytes_formula: ClassVar[str] = ""  # its stage-3 bytes as a formula (the README's table)
    reveals: ClassVar[str] = ""  # what a peer or the coordinator learns from what travels
    trains: ClassVar[bool] = True  # has gate rounds
    needs_answers: ClassVar[bool] = True  # trains on every expert's answers on the own data
    exchanges: ClassVar[bool] = False  # has a one-off exchange (client_stats -> combine -> install)
    sync: ClassVar[Sync] = "none"
    prefixes: ClassVar[tuple[str, ...]] = ()  # for sync == "prefix"
    has_gate: ClassVar[bool] = True  # holds a gate module (saved in the stage-3 checkpoint)
    personal_knob: ClassVar[bool] = False  # its readout takes ``personal`` (``readout``, ``personal`` below)
    can_join: ClassVar[bool] = False  # members join and leave a trained network without retraining (``regate``)

    # ------------------------------------------------------------------ the module

    def make_gate(self, cfg, num_classes: int) -> nn.Module | None:
        """The client's gate: N logits per latent. ``cfg`` is the experiment config."""
        return Gate(cfg.model.latent_dim, cfg.model.gate_hidden, cfg.num_clients)

    def check_config(self, cfg) -> list[tuple[str, str]]:
        """``[(field, problem)]`` for the variant's own config knobs (empty: fine)."""
        return []

    # ------------------------------------------------------------------ the one-off exchange

    def client_stats(self, client: ClientView) -> dict:
        """Client side: what this client sends up (statistics of its latents, never a sample)."""
        raise NotImplementedError(f"{self.name} has no exchange")

    def combine(self, stats: dict[int, dict], num_clients: int) -> Any:
        """Coordinator side: every client's statistics -> what goes down to each client."""
        return stats

    def install(self, client: ClientView, gate: nn.Module | None, shared: Any) -> Cost:
        """Client side: take what came down; returns the bytes it cost this client to use it."""
        return {"bytes_out": 0, "bytes_in": 0}

    def payload_bytes(self, payload: Any) -> int:
        return payload_bytes(payload)

    # ------------------------------------------------------------------ membership (``can_join`` variants)

    def regate(self, state: dict | None, shared: Any, num_experts: int) -> dict | None:
        """A member's saved gate after the network changed: ``shared`` is ``combine`` over the members' statistics,
        ``num_experts`` the new number of expert slots (a member that left keeps its slot, masked). A gate with an
        N-way trained head cannot do this honestly: only variants with ``can_join`` implement it."""
        raise NotImplementedError(f"{self.name} cannot take members in or out without retraining")

    # ------------------------------------------------------------------ gate rounds

    def aggregate(self, states: list[dict], weights: list[float]) -> dict | None:
        """Coordinator side, each round: what is synchronised (None: nothing). The ring's
        hand-over needs no aggregate: the coordinator passes the gate on as it comes back."""
        if self.sync == "prefix":
            return federated.fedavg(states, weights, include=self.prefixes)
        if self.sync == "whole":
            return federated.fedavg(states, weights)
        return None

    def training_data(self, client: ClientView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(latents, labels, every expert's answers)`` the gate trains on."""
        return client.latents(), client.y, client.answers()

    def fit(self, client: ClientView, gate: nn.Module, incoming: dict | None, seed: int) -> tuple[dict, dict]:
        """One round on one client: merge what was synchronised in, train on ``training_data``."""
        if incoming:
            gate.load_state_dict(federated.partial_sync(gate.state_dict(), incoming))
        h, y, answers = self.training_data(client)
        r = client.cfg.routing
        return local.fit_gate(
            gate, h, answers, y, client.cfg.stage3, r.top_k, r.noise_std, seed=seed, available=client.available
        )

    # ------------------------------------------------------------------ routed inference

    @torch.no_grad()
    def choose(
        self,
        gate: nn.Module | None,
        h: torch.Tensor,
        k: int,
        available: torch.Tensor | None,
        num_experts: int,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(experts [B, k], weights [B, k])`` for latents ``h``; ``seed`` is the client's routing seed."""
        return routing.noisy_topk(gate(h), k, available=available)

    def readout(self, gate: nn.Module | None, personal: float | None = None) -> routing.ClassReadout | None:
        """How the chosen experts' answers are combined: None is the weighted sum. ``personal``
        in [0, 1] asks for a readout that far toward the own label mix (variants with
        ``personal_knob`` only)."""
        return None

    def personal(self, gate: nn.Module | None) -> float | None:
        """How personal the readout is now, in [0, 1]; None: this variant has no such knob."""
        return None

    def chosen_on_validation(self, cfg) -> bool:
        """Whether the run chooses the ``personal`` knob on validation data (the config leaves it open)."""
        return False

    def with_personal(self, state: dict, personal: float) -> dict:
        """A saved gate's state with its ``personal`` knob set (variants that have one)."""
        raise NotImplementedError(f"{self.name} has no personal knob")
