"""The stage-1 interface: one ``Objective`` subclass per way of training F federatedly.

An objective says what it federates (``prefixes`` of the ``Stage1Model`` state that FedAvg
averages) and its loss on one batch. Every objective's supervised term may be logit
adjusted (``stage1.logit_adjust``, see ``logit_adjust.py``): the caller passes the shift.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class Objective:
    """A stage-1 objective; register a subclass with ``@OBJECTIVES.register("name")``."""

    name: ClassVar[str] = ""  # set by the registry
    prefixes: ClassVar[tuple[str, ...]] = ("extractor.", "classifier.")  # what FedAvg averages

    def loss(
        self, model, xb: torch.Tensor, yb: torch.Tensor, shift: torch.Tensor, gen: torch.Generator, cfg
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` on one batch; ``shift`` is added to the logits the supervised term sees,
        ``gen`` draws any randomness (augmentations), ``cfg`` is ``stage1``'s config."""
        raise NotImplementedError
