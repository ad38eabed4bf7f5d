"""Model zoo of the AWP paper, a small CPU-friendly CNN, timm models, RobustBench's and your own.

Every model takes inputs in [0, 1] of shape (B, C, H, W) and returns logits (B, num_classes); C must be the
`in_channels` it was built with (default 3): other input raises ValueError.
Per-channel normalization is the first layer inside the model (RobustBench convention), so attacks
and their eps always live in pixel space. A model name is a built-in one (`REGISTRY`), `timm:<name>`,
`robustbench:<Name>` or `package.module:callable` (`sources.SOURCES`: one mechanism for the four).
RobustBench's networks normalize inside themselves already, so theirs gets the identity: never twice.

    >>> from flatrobust import models
    >>> net = models.create("preactresnet18", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    >>> own = models.create("mynets:build", num_classes=10, in_channels=3, input_size=32, depth=4)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .normalize import Normalize
from .preactresnet import PreActResNet18
from .smallcnn import SmallCNN
from .sources import REGISTRY, SOURCES, ModelError, Source, architecture_args, check_name, imports_code, resolve, run_args, source_of
from .vgg import VGG19
from .wideresnet import WideResNet


class NormalizedModel(nn.Sequential):
    """`Normalize` followed by the network; `.net` is the network without normalization."""

    def __init__(self, normalize: Normalize, net: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.net = net


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:160]


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    input_size: int | None = None,
    search_path: Sequence[str] = (),
    **model_args,
) -> nn.Module:
    """Build model `name` (built in, `timm:<name>`, `robustbench:<Name>` or `package.module:callable`) with
    normalization by (mean, std) inside.

    mean/std default to 0 and 1 per channel (identity normalization). A source whose networks normalize
    themselves (`robustbench:<Name>`: the zoo's own constants, or none) gets the identity whatever mean/std
    say, so an input is never normalized twice. `model_args` go to the builder
    (e.g. `width=16, stem_stride=2` for preactresnet18). With `input_size`, one forward pass in eval mode on
    a zero batch (2, in_channels, input_size, input_size) checks that the output is (2, num_classes) logits.
    `search_path`: folders searched first for the module of a `package.module:callable` model.
    Every problem is a `ModelError` (a ValueError) with one line.
    """
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ModelError(f"in_channels must be >= 1, got {in_channels}")
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ModelError(f"mean and std need {in_channels} values each (one per channel), got {mean} and {std}")
    builder = resolve(name, search_path)
    if source_of(name).normalizes_inside:
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    try:
        net = builder(num_classes, in_channels, **model_args)
    except TypeError as e:
        if model_args and "unexpected keyword" in str(e):
            raise ModelError(f"model {name!r} does not take {str(e).split('argument')[-1].strip()}: "
                             f"remove it from model_args") from None
        raise ModelError(f"model {name!r} could not be built ({type(e).__name__}: {_first_line(e)})") from None
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's builder may raise anything: one line
        raise ModelError(f"model {name!r} could not be built ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"model {name!r} returned an object of type {type(net).__name__}, not a torch.nn.Module: return the network itself")
    model = NormalizedModel(Normalize(mean, std), net)
    if input_size is not None:
        check_output(model, name, (in_channels, input_size, input_size), num_classes)
    return model


def check_output(model: nn.Module, name: str, input_shape: Sequence[int], num_classes: int) -> None:
    """One forward pass (eval mode, no gradient, zeros: no state or RNG touched) of a batch of 2 inputs of
    `input_shape`; ModelError (one line) unless it returns a (2, num_classes) tensor of logits."""
    shape = (2, *input_shape)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, device=device))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model {name!r} fails on a batch of shape {shape} ({type(e).__name__}: {_first_line(e)}): "
                         f"it must take {input_shape[0]}-channel {input_shape[1]}x{input_shape[2]} images (the dataset's)") from None
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if not isinstance(out, torch.Tensor) or got != (2, num_classes):
        raise ModelError(f"model {name!r} returns {got} for a batch of shape {shape}: it must return logits of shape "
                         f"(2, {num_classes}), one per class of the dataset")


__all__ = ["REGISTRY", "SOURCES", "ModelError", "Source", "architecture_args", "check_name", "check_output", "create", "imports_code",
           "resolve", "run_args", "source_of", "Normalize",
           "NormalizedModel", "PreActResNet18", "WideResNet", "VGG19", "SmallCNN"]
