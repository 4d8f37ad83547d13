"""Stage-1 objectives, one module each, registered by name in ``training.registry.OBJECTIVES``."""

from training.objectives import fedce, fedsc  # noqa: F401
from training.objectives.base import Objective
from training.objectives.logit_adjust import prior_shift
from training.registry import OBJECTIVES


def get(name: str) -> Objective:
    return OBJECTIVES.get(name)()


def prefixes(name: str) -> tuple[str, ...]:
    """What stage 1 federates under objective ``name``."""
    return OBJECTIVES.get(name).prefixes


__all__ = ["OBJECTIVES", "Objective", "get", "prefixes", "prior_shift"]
