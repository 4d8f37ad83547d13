"""Logit adjustment of any objective's supervised term (``stage1.logit_adjust`` = tau).

The cross-entropy scores ``logits + tau * log(own label prior)``: the client's prior explains
its label skew, so F and the shared classifier learn the balanced p(c | x) instead of each
client pulling them toward its few classes (logit-adjusted / balanced-softmax loss, as in
FedLC). tau = 0 is the plain objective. It sends nothing extra.
"""

from __future__ import annotations

import torch

from training.prototypes import label_log_prior


def prior_shift(tau: float, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``tau * log prior`` of a client's labels ``y`` ([C]; zeros when tau = 0)."""
    return tau * label_log_prior(torch.bincount(y, minlength=num_classes))
