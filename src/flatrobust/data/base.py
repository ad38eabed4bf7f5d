"""The types every data source shares: `DataError`, `DatasetInfo`, `TensorData`, `DataSpec`, and pixel helpers.

A split is held as one float32 tensor (N, C, H, W) with pixels in [0, 1] and int64 labels; the per-channel
normalization (`DatasetInfo.mean`/`.std`) is the first layer of the model, so attacks work in pixel space.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
import torch

DEFAULT_ROOT = "./data"


class DataError(ValueError):
    """Data that is missing, corrupted or malformed; the message (one line) names the file and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    `mean`/`std` are the per-channel statistics of the [0, 1] pixels that the model's Normalize layer uses;
    `stats_from` says where they come from: "registry" (the published statistics of a built-in set),
    "recipe" (`data.mean`/`data.std`) or "training split" (computed from every training image).
    `train_size`/`test_size` are the sizes of the full splits; `classes` the class names, when the data has
    them (image folders: the folder names; .npz: its `classes` array).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int  # images are square: (in_channels, image_size, image_size)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_augment: Literal["crop_flip", "none"]
    train_size: int
    test_size: int
    classes: tuple[str, ...] = ()
    stats_from: str = "registry"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetInfo:
        """The inverse of `to_dict`, also for dicts written by older versions (missing fields take their
        defaults, unknown fields are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        if "stats_from" not in d and d.get("name") in ("imagefolder", "npz"):
            kw["stats_from"] = "training split"  # the only way before data.mean/data.std existed
        return cls(**kw)

    def describe(self) -> str:
        """One line for logs and reports, e.g. "10 classes (airplane, ...), 3x32x32, 50000 train / 10000 test"."""
        names = ""
        if self.classes:
            shown = ", ".join(self.classes[:10]) + (", ..." if len(self.classes) > 10 else "")
            names = f" ({shown})"
        return (f"{self.num_classes} classes{names}, {self.in_channels}x{self.image_size}x{self.image_size}, "
                f"{self.train_size} train / {self.test_size} test images, normalization from the {self.stats_from}")


@dataclass
class TensorData:
    """One split held as tensors: `x` float32 (N, C, H, W) in [0, 1], `y` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> TensorData:
        """The same data on `device` (a new TensorData; self is left as is)."""
        return TensorData(self.x.to(device), self.y.to(device), self.info)

    def subset(self, n: int, seed: int = 0) -> TensorData:
        """A fixed subset of min(n, N) examples, the same for the same (n, seed) on any device.

        Indices come from a CPU generator (device RNG streams differ) and are sorted so the
        subset keeps the original order. Used for per-epoch evaluation on fixed subsets.
        """
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values.to(self.x.device)
        return TensorData(self.x[idx], self.y[idx], self.info)


@dataclass(frozen=True)
class DataSpec:
    """What a recipe's `data:` section says about where the data comes from (the keys `load_split` reads).

    `name` is a registry entry (`flatrobust.data.REGISTRY`); `root` its file or folder; `image_size` and
    `channels` apply to image folders; `mean`/`std`, when given, replace the dataset's normalization.
    """

    name: str
    root: str | None = None
    download: bool = False
    image_size: int = 0
    channels: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @classmethod
    def of(cls, spec: Any) -> DataSpec:
        """A DataSpec from a DataSpec, a mapping (a recipe's data section, e.g. a checkpoint's
        `config["data"]`) or an object with these attributes (`config.DataConfig`); other keys are ignored."""
        if isinstance(spec, DataSpec):
            return spec
        get = spec.get if isinstance(spec, Mapping) else (lambda k, d=None: getattr(spec, k, d))
        root = get("root")
        return cls(name=str(get("name")), root=None if root in (None, "") else str(os.fspath(root)),
                   download=bool(get("download") or False), image_size=int(get("image_size") or 0),
                   channels=int(get("channels") or 0), mean=tuple(float(v) for v in get("mean") or ()),
                   std=tuple(float(v) for v in get("std") or ()))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def uint8_to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> contiguous float32 in [0, 1]."""
    x = torch.as_tensor(x).contiguous()  # make contiguous while still 1 byte per pixel
    return x.to(torch.float32).div_(255)


def channel_stats(x: np.ndarray | torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of images (N, C, H, W), on the [0, 1] scale.

    uint8 images are counted through a 256-bin histogram per channel (exact, and fast on 50,000 images);
    float images are reduced in float64.
    """
    x = torch.as_tensor(x)
    mean, std = [], []
    for c in range(x.shape[1]):
        if x.dtype == torch.uint8:
            counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
            values = torch.arange(256, dtype=torch.float64) / 255
            m = float((counts * values).sum() / counts.sum())
            s = float(((counts * (values - m) ** 2).sum() / counts.sum()).sqrt())
        else:
            xc = x[:, c].double()
            m, s = float(xc.mean()), float(xc.std(unbiased=False))
        mean.append(m)
        std.append(s)
    return tuple(mean), tuple(std)


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """uint8 images (N, C, H, W) with C in {1, 3} as `channels` channels (0: unchanged).

    Greyscale to RGB repeats the channel; RGB to greyscale is ITU-R 601-2 luma with the integer arithmetic
    of Pillow's `convert("L")`, so that converting the decoded RGB pixels here gives Pillow's grey values.
    """
    if channels in (0, x.shape[1]):
        return x
    if channels == 3 and x.shape[1] == 1:
        return np.repeat(x, 3, axis=1)
    if channels == 1 and x.shape[1] == 3:
        r, g, b = (x[:, i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]
    raise DataError(f"cannot convert {x.shape[1]}-channel images to {channels} channels: use 1 (greyscale) or 3 (RGB)")


def normalization(spec: DataSpec, x: np.ndarray | torch.Tensor | None, channels: int, where: object = "the data"
                  ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, stats_from): the recipe's `data.mean`/`data.std` when given, else the statistics of `x`
    (the whole training split, (N, C, H, W)). DataError when the recipe's values do not fit the data or a
    channel of the training images is constant (std 0 cannot normalize)."""
    if spec.mean or spec.std:
        if len(spec.mean) != channels or len(spec.std) != channels:
            raise DataError(f"data.mean and data.std need {channels} value(s) each, one per channel of the "
                            f"{'greyscale' if channels == 1 else 'RGB'} images, got {list(spec.mean)} and {list(spec.std)}")
        return spec.mean, spec.std, "recipe"
    mean, std = channel_stats(x)
    if any(s == 0 for s in std):
        raise DataError(f"{where}: a channel of the training images is constant (std {list(std)}), which cannot be normalized: "
                        "give data.mean and data.std")
    return mean, std, "training split"
