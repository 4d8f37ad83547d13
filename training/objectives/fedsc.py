"""FedSC: cross-entropy + lambda * NT-Xent (SimCLR) on two augmented views of each local image.

Our reading of the paper's "supervised + self-supervised". It federates the projection head
too (``projector.*``), which stage 1 drops afterwards.
"""

from __future__ import annotations

import torch.nn.functional as F

from training.data import two_views
from training.losses import nt_xent
from training.objectives.base import Objective
from training.registry import OBJECTIVES


@OBJECTIVES.register("fedsc")
class FedSC(Objective):
    prefixes = ("extractor.", "classifier.", "projector.")

    def loss(self, model, xb, yb, shift, gen, cfg):
        logits = model.classifier(model.extractor(xb)) + shift
        v1, v2 = two_views(xb, gen)
        z1 = model.projector(model.extractor(v1))
        z2 = model.projector(model.extractor(v2))
        return F.cross_entropy(logits, yb) + cfg.sc_lambda * nt_xent(z1, z2, cfg.temperature), logits
