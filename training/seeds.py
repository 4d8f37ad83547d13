"""Every seed NMoE derives from ``cfg.seed``, in one place.

The client actors, the coordinator, Serve and the benchmarks call these, so the same
config draws the same numbers wherever it runs.
"""

from __future__ import annotations


def client_round(seed: int, round_: int, client: int) -> int:
    """A client's local training in one federated round (stage 1 and gate rounds)."""
    return seed * 1000 + round_ * 100 + client


def expert_init(seed: int, client: int) -> int:
    """The global torch seed before a client builds its expert (and its gates)."""
    return seed * 1000 + 17 * client + 1


def expert_fit(seed: int, client: int) -> int:
    """A client's stage-2 batches."""
    return seed * 1000 + client


def routing(seed: int, client: int) -> int:
    """A client's routing draws (RanGate's random experts), the same in actors and Serve."""
    return seed * 1000 + client


def synthetic(seed: int, client: int) -> int:
    """A client's draws of synthetic latents from its peers' statistics (ProtoGate)."""
    return seed * 1000 + 31 * client + 7


def centralized(seed: int) -> int:
    """The centralized-MoE baseline's initial weights."""
    return seed + 7


def participants(seed: int, stage: str, round_: int) -> list[int]:
    """Who takes part in round ``round_`` of ``stage`` ("stage1", "stage3"): a NumPy seed sequence."""
    return [seed, {"stage1": 1, "stage3": 3}[stage], round_]
