"""PreActResNet-18 (He et al. 2016, identity mappings), the CIFAR variant used by Rice et al. and AWP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x  # projection sees the pre-activated input
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """11.17M parameters for 10 classes; input (B, C, 32, 32) (any size >= 8 works via global pooling).

    `width` (64 in the paper) scales every stage (width, 2, 4, 8 x width channels; parameters grow as its
    square); `stem_stride=2` makes the first convolution stride 2, so every stage runs at half the
    resolution: about 4x fewer operations, the same parameters. Both are CPU-scale knobs (docs/RESULTS.md).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, stem_stride: int = 1):
        super().__init__()
        if width < 1 or stem_stride not in (1, 2):
            raise ValueError(f"width must be >= 1 and stem_stride 1 or 2, got width={width}, stem_stride={stem_stride}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False)
        layers, in_planes = [], width
        for planes, stride in [(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)]:
            layers += [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(8 * width)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 8 * width)
        return self.linear(out)
