"""Mixup (Zhang et al. 2018) as the official training script applies it to adversarial training.

One mixing weight per batch, lam ~ Beta(alpha, alpha) (lam = 1 when alpha <= 0), a random permutation of the
batch, inputs mixed before the attack: x~ = lam * x + (1 - lam) * x[perm]. The loss of a prediction is the same
mixture of the two labels' losses, lam * L(f(x'), y) + (1 - lam) * L(f(x'), y[perm]), for the attack (which
maximises it) and for the training step alike. Cross-entropy only: TRADES' and MART's losses compare the
model's own distributions and have no mixed-label form, so mixup is refused with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Mixed:
    """A mixed batch: inputs, both label sets and the weight of the first."""

    x: torch.Tensor  # (N, C, H, W)
    y_a: torch.Tensor  # (N,) the batch's own labels
    y_b: torch.Tensor  # (N,) the labels of the images mixed in
    lam: float

    def loss(self, logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)."""
        return (self.lam * F.cross_entropy(logits, self.y_a, reduction=reduction)
                + (1 - self.lam) * F.cross_entropy(logits, self.y_b, reduction=reduction))

    def soft_targets(self, num_classes: int) -> torch.Tensor:
        """(N, K) lam * onehot(y_a) + (1 - lam) * onehot(y_b): cross-entropy against them is `loss` (CE is linear in
        its target), so an attack and an objective written for labels take the mixed batch unchanged."""
        return self.lam * F.one_hot(self.y_a, num_classes).float() + (1 - self.lam) * F.one_hot(self.y_b, num_classes).float()


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float) -> Mixed:
    """Mix a batch with a permutation of itself. lam and the permutation come from torch's global RNG, as PGD's
    random start does (a run seeds it, and a checkpoint saves and restores it)."""
    lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample()) if alpha > 0 else 1.0
    perm = torch.randperm(len(x)).to(x.device)
    return Mixed(lam * x + (1 - lam) * x[perm], y, y[perm], lam)
