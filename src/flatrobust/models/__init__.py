"""Model zoo of the AWP paper, plus a small CPU-friendly CNN.

Every model takes inputs in [0, 1] of shape (B, C, H, W) and returns logits (B, num_classes); C must be the
`in_channels` it was built with (default 3): other input raises ValueError.
Per-channel normalization is the first layer inside the model (RobustBench convention), so attacks
and their eps always live in pixel space.

    >>> from flatrobust import models
    >>> net = models.create("preactresnet18", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from .normalize import Normalize
from .preactresnet import PreActResNet18
from .smallcnn import SmallCNN
from .vgg import VGG19
from .wideresnet import WideResNet

# name -> builder(num_classes, in_channels) returning the un-normalized network. A plain dict that the
# tests enumerate; add a model by adding an entry.
REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "preactresnet18": lambda num_classes, in_channels, **kw: PreActResNet18(num_classes, in_channels, **kw),
    "wrn34_10": lambda num_classes, in_channels: WideResNet(34, 10, num_classes, in_channels),
    "wrn28_10": lambda num_classes, in_channels: WideResNet(28, 10, num_classes, in_channels),
    "vgg19": lambda num_classes, in_channels: VGG19(num_classes, in_channels),
    "smallcnn": lambda num_classes, in_channels: SmallCNN(num_classes, in_channels),
}


class NormalizedModel(nn.Sequential):
    """`Normalize` followed by the network; `.net` is the network without normalization."""

    def __init__(self, normalize: Normalize, net: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.net = net


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **model_args,
) -> nn.Module:
    """Build model `name` from `REGISTRY` with normalization by (mean, std) inside.

    mean/std default to 0 and 1 per channel (identity normalization). `model_args` go to the builder
    (e.g. `width=16, stem_stride=2` for preactresnet18).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(sorted(REGISTRY))}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values each (one per channel), got {mean} and {std}")
    try:
        net = REGISTRY[name](num_classes, in_channels, **model_args)
    except TypeError as e:
        if model_args and "unexpected keyword" in str(e):
            raise ValueError(f"model {name!r} does not take {str(e).split('argument')[-1].strip()}: "
                             f"remove it from model_args") from None
        raise
    return NormalizedModel(Normalize(mean, std), net)


__all__ = ["REGISTRY", "create", "Normalize", "NormalizedModel", "PreActResNet18", "WideResNet", "VGG19", "SmallCNN"]
