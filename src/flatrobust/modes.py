"""Context managers for a model's train/eval mode and its BatchNorm statistics."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode forward passes inside this block use batch statistics but do not update running stats.

    With `track_running_stats=False` a BatchNorm layer in train mode normalizes with the batch's own
    statistics (as it would anyway) and neither the running mean/var nor `num_batches_tracked` change.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


@contextlib.contextmanager
def train_mode(model: nn.Module, training: bool = True) -> Iterator[None]:
    """Set `model.train(training)` inside the block and give every submodule its own mode back after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
