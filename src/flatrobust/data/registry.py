"""The dataset registry: every name `data.name` accepts, built-in sets and your own data alike.

Each entry is a `Source`: how to load a split from a `DataSpec` and what `data.root` means for it. The
built-in sets carry fixed facts (`Source.info`, also in `DATASETS`); the kinds `imagefolder` and `npz`
take theirs (classes, channels, size, normalization) from the training split.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .arrays import load_npz
from .base import DataError, DatasetInfo, DataSpec, TensorData, normalization
from .builtin import DATASETS, TITLES, load_builtin
from .imagefolder import load_imagefolder

OPTIONS = ("download", "image_size", "channels")  # DataSpec keys that only some sources take


@dataclass(frozen=True)
class Source:
    """One registered dataset name."""

    name: str
    title: str
    root: str  # what data.root names for this source
    load: Callable[[DataSpec, str, DatasetInfo | None, bool], TensorData]  # (spec, split, like, progress) -> the split
    info: DatasetInfo | None = None  # fixed facts of a built-in set; None when they come from the data
    options: frozenset[str] = frozenset()  # which of OPTIONS it takes


def _builtin(name: str) -> Source:
    def load(spec: DataSpec, split: str, like: DatasetInfo | None, progress: bool) -> TensorData:
        x, y = load_builtin(name, split, spec.root, spec.download)
        return TensorData(x, y, _with_recipe_stats(DATASETS[name], spec))

    return Source(name, TITLES[name], "the torchvision root (default ./data)", load, DATASETS[name], frozenset({"download"}))


def _with_recipe_stats(info: DatasetInfo, spec: DataSpec) -> DatasetInfo:
    if not (spec.mean or spec.std):
        return info
    mean, std, stats_from = normalization(spec, None, info.in_channels)
    return dataclasses.replace(info, mean=mean, std=std, stats_from=stats_from)


REGISTRY: dict[str, Source] = {
    **{name: _builtin(name) for name in DATASETS},
    "imagefolder": Source("imagefolder", "image folder", "a folder holding train/<class>/* and test/<class>/* (or val/)",
                          lambda spec, split, like, progress: load_imagefolder(spec, split, like=like, progress=progress), None,
                          frozenset({"image_size", "channels"})),
    "npz": Source("npz", "arrays (.npz)", "an .npz file with arrays x_train, y_train, x_test, y_test",
                  lambda spec, split, like, progress: load_npz(spec, split, like)),
}


def _source(spec: DataSpec) -> Source:
    if spec.name not in REGISTRY:
        raise DataError(f"unknown dataset {spec.name!r}; known: {', '.join(REGISTRY)}")
    source = REGISTRY[spec.name]
    for option in OPTIONS:
        if getattr(spec, option) and option not in source.options:
            takers = [n for n, s in REGISTRY.items() if option in s.options]
            what = "the built-in datasets" if option == "download" else f"data.name {' / '.join(takers)}"
            raise DataError(f"data.{option} applies to {what}, not to {spec.name}: remove it")
    return source


def load_split(spec: DataSpec | Mapping[str, Any] | Any, split: str = "train", like: DatasetInfo | None = None, *,
               progress: bool = False) -> TensorData:
    """One split ("train" or "test") of the data a recipe's `data:` section describes, as CPU tensors.

    `spec`: a `DataSpec`, a recipe's data section as a mapping (e.g. a checkpoint's `config["data"]`) or a
    `config.DataConfig`. `like`: the training data's `DatasetInfo` (e.g. from a checkpoint), which image
    folders and .npz files are read against (class names, channels, size, normalization); built-in sets
    have fixed facts and ignore it. `progress`: report a long first read (decoding an image folder) as
    `flatrobust.progress` does. Every problem with the data is a one-line `DataError`.
    """
    spec = DataSpec.of(spec)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _source(spec).load(spec, split, like, progress)


def dataset_info(spec: DataSpec | Mapping[str, Any] | Any, *, progress: bool = False) -> DatasetInfo:
    """The facts of the data a spec describes: a built-in set's registry entry (with the recipe's
    normalization, if given), or the training split's info for image folders and .npz (which reads it)."""
    spec = DataSpec.of(spec)
    source = _source(spec)
    if source.info is not None:
        return _with_recipe_stats(source.info, spec)
    return source.load(spec, "train", None, progress).info


def info_from_checkpoint(state: Mapping[str, Any]) -> DatasetInfo:
    """The training data's info stored in a checkpoint (`data_info`), or for checkpoints written before it
    was stored, the registry entry of its `config["data"]["name"]`."""
    if state.get("data_info"):
        return DatasetInfo.from_dict(state["data_info"])
    return DATASETS[state["config"]["data"]["name"]]


def load_dataset(name: str, split: str = "train", root: Any = None, download: bool = False, image_size: int = 0) -> TensorData:
    """A whole split of a registered dataset as CPU tensors (see `TensorData`): `load_split` for a name and root.

    `root` (default ./data) is the torchvision root for the built-in sets (`download=True` lets torchvision
    fetch what is missing; digits ships with scikit-learn), the folder of an `imagefolder`, the file of an `npz`.
    """
    return load_split(DataSpec(name, None if root is None else str(root), download=download, image_size=image_size), split)
