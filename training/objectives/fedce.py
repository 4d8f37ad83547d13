"""FedCE: FedAvg of F and a linear classifier trained with cross-entropy on local labels."""

from __future__ import annotations

import torch.nn.functional as F

from training.objectives.base import Objective
from training.registry import OBJECTIVES


@OBJECTIVES.register("fedce")
class FedCE(Objective):
    def loss(self, model, xb, yb, shift, gen, cfg):
        logits = model.classifier(model.extractor(xb)) + shift
        return F.cross_entropy(logits, yb), logits
