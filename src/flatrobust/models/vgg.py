"""VGG-19 with BatchNorm, CIFAR variant (one 512 -> num_classes linear layer after global pooling)."""
from __future__ import annotations

import torch
from torch import nn

CFG_19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG19(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in CFG_19:
            if v == "M":
                # ceil_mode keeps inputs smaller than 32x32 (down to 8x8) valid: spatial size never reaches 0
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)  # (B, 512, 1, 1) for 32x32 inputs
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))
