"""Losses the attacks ascend. Each returns the SUM over the batch, so that the input gradient of each
example does not depend on the batch size (PGD's sign / normalized steps make the scale irrelevant)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example CW margin max_{j != y} z_j - z_y (B,): positive means misclassified (Carlini & Wagner 2017)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return other - z_y


def cw_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cw_margin(logits, y).sum()


def kl_loss(logits_adv: torch.Tensor, p_nat: torch.Tensor) -> torch.Tensor:
    """KL(p_nat || softmax(logits_adv)) summed over the batch: the TRADES inner maximization."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), p_nat, reduction="sum")
