"""Detect a run that AWP has collapsed to a constant prediction (docs/AWP_COLLAPSE.md).

With AWP active from the first step, a network that has learned nothing yet can be driven to predict one
class for every input. On digits every unit of SmallCNN's fc1 layer switched off and the run never recovered:
the dead network is flat, so neither the training gradient nor the weight perturbation moves it. A network
with BatchNorm before every ReLU (the study's PreActResNet-18) can leave the plateau, after tens of epochs.

At every epoch end the training loop measures `top_class_share`, the share of the test monitoring subset
given the most frequent predicted class (one clean forward pass in eval mode), and `collapse_warning`
returns one line when the last `patience` epochs all had AWP active, (nearly) one predicted class
(share >= `SHARE`) and a clean test accuracy no better than a constant prediction's (the largest class
share plus 3 binomial standard deviations). docs/AWP_COLLAPSE.md gives the measurements behind the
thresholds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

PATIENCE = 3  # consecutive epochs (see docs/AWP_COLLAPSE.md: runs that came back were collapsed for at most 2)
SHARE = 0.9  # at least this share of the test subset gets the same predicted class


@dataclass(frozen=True)
class ChanceLevel:
    """The accuracy of the best constant prediction on a labelled subset, and how far noise takes it."""

    share: float  # the largest class share: what predicting that class for every image scores
    n: int  # the subset size

    @classmethod
    def of(cls, labels: torch.Tensor) -> "ChanceLevel":
        n = int(labels.numel())
        if n == 0:
            return cls(1.0, 0)
        return cls(float(torch.bincount(labels.flatten().long().cpu()).max()) / n, n)

    @property
    def ceiling(self) -> float:
        """Accuracies at or below this are indistinguishable from a constant prediction (share + 3 sigma)."""
        if self.n == 0:
            return 1.0
        return self.share + 3 * math.sqrt(self.share * (1 - self.share) / self.n)


@torch.no_grad()
def top_class_share(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> float:
    """Share of `x` that the model (in eval mode, no gradient) assigns to its most frequent predicted class."""
    if len(x) == 0:
        return 0.0
    was_training = model.training
    model.eval()
    try:
        preds = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)
    return float(torch.bincount(preds).max()) / len(x)


def collapse_warning(history: Sequence[dict], *, chance: ChanceLevel, patience: int = PATIENCE,
                     share: float = SHARE) -> str | None:
    """One line when the last `patience` epoch records show a collapsed model under AWP, else None.

    `history` holds the records of `metrics.jsonl` (keys `epoch`, `awp_active`, `test_clean_acc` as a
    fraction, `test_top_class_share`); `chance` is the chance level of the test monitoring subset.
    """
    if patience < 1 or len(history) < patience:
        return None
    recent = history[-patience:]
    for r in recent:
        if not (r.get("awp_active") and r.get("test_top_class_share", 0.0) >= share
                and r["test_clean_acc"] <= chance.ceiling):
            return None
    last = recent[-1]
    return (f"epochs {recent[0]['epoch']}-{last['epoch']} with AWP active: the model gives one class to "
            f"{last['test_top_class_share']:.1%} of the test images (clean accuracy {last['test_clean_acc']:.1%}, "
            f"chance {chance.share:.1%}); AWP has likely collapsed it (docs/AWP_COLLAPSE.md): "
            "restart with awp.warmup=5 (plain training first) or a lower awp.gamma")
