from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a layer so that attacks see pixels in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        channels = self.mean.shape[1]
        if x.dim() != 4 or x.shape[1] != channels:  # broadcasting would otherwise hide a wrong channel count
            got = f"{x.shape[1]} channel{'s' if x.shape[1] != 1 else ''}, shape" if x.dim() == 4 else "shape"
            raise ValueError(f"the model expects images (B, {channels}, H, W) and got {got} {tuple(x.shape)}: "
                             f"build it for the data (models.create(..., in_channels=C, mean=..., std=...)) "
                             "or convert the images")
        return (x - self.mean) / self.std
