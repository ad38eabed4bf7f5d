"""Images from NumPy arrays: `.npz` files read without pickle, and the `npz` dataset kind.

`data.name: npz`, `data.root: FILE.npz` with arrays `x_train`, `y_train`, `x_test`, `y_test` and optionally
`classes` (the class names, a string array):

- images uint8 (N, H, W, C) in 0..255, or float (N, C, H, W) in [0, 1]; (N, H, W) for greyscale; C = 1 or 3,
  square images (the other layout is accepted where the channel axis is unambiguous);
- labels integers 0..K-1, K = len(classes) when given, else the largest training label + 1; every class of
  the test split must occur in the training split.

Every problem is a `DataError` of one line naming the file.
"""
from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .base import DataError, DatasetInfo, DataSpec, TensorData, normalization

ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: str | os.PathLike, what: str, hint: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read without pickle; DataError (one line, prefixed `what`) otherwise.

    Each array's header is read first: one that declares more bytes than its member holds (a damaged file, or
    a header written to make the reader allocate a huge array) is refused before anything is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: {str(path)!r} does not exist: pass {hint}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{what}: {str(path)!r} is not a readable .npz (zip) file: write it with numpy.savez")
    try:
        _check_headers(path)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except DataError as e:
        raise DataError(f"{what}: {e}") from None
    except ValueError as e:
        if "allow_pickle" in str(e):  # object arrays need pickle
            raise DataError(f"{what}: {str(path)!r} holds pickled (object) arrays, refused for safety: save plain numeric "
                            "arrays with numpy.savez") from None
        raise DataError(f"{what}: {str(path)!r} is not a readable .npz (ValueError: {_first_line(e)}): write it with numpy.savez") from None
    except Exception as e:  # noqa: BLE001 - damaged members become one line
        raise DataError(f"{what}: {str(path)!r} is not a readable .npz ({type(e).__name__}): write it with numpy.savez") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:120]


def _check_headers(path: Path) -> None:
    """DataError when an .npy member's header declares an array larger than the bytes the member holds."""
    from numpy.lib import format as npy

    with zipfile.ZipFile(path) as zf:
        for member in zf.infolist():
            if not member.filename.endswith(".npy"):
                continue
            with zf.open(member) as f:
                try:
                    version = npy.read_magic(f)
                    read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
                    if read is None:
                        continue  # a newer header version: np.load checks it
                    shape, _, dtype = read(f)
                except ValueError as e:
                    raise DataError(f"{str(path)!r}: array {member.filename[:-4]!r} has a damaged header ({_first_line(e)}): "
                                    "write the file again with numpy.savez") from None
                header = f.tell()
            if dtype.hasobject:
                continue  # np.load refuses it (pickle): said as such above
            declared = math.prod(shape) * dtype.itemsize
            held = member.file_size - header
            if declared > held:
                raise DataError(f"{str(path)!r}: array {member.filename[:-4]!r} declares shape {shape} of {dtype} "
                                f"({_bytes(declared)}) but holds {_bytes(held)}: the file is truncated or damaged, "
                                "write it again with numpy.savez")


def _bytes(n: float) -> str:
    """8000000000 -> '8 GB'."""
    if n < 1000:
        return f"{int(n)} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"


def images_to_tensor(x: np.ndarray, info: DatasetInfo, what: str) -> torch.Tensor:
    """Images as float32 (N, C, H, W) in [0, 1] from uint8 (N, H, W, C) / (N, C, H, W) / (N, H, W), or floats in
    [0, 1]; DataError unless they have the dataset's channels and size."""
    channels = info.in_channels
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{what}: images must have 3 or 4 dimensions (N, H, W[, C]), got shape {x.shape}")
    if x.shape[1] != channels and x.shape[-1] == channels:  # channels last, as torchvision's CIFAR arrays
        x = x.transpose(0, 3, 1, 2)
    want = (channels, info.image_size, info.image_size)
    if tuple(x.shape[1:]) != want:
        raise DataError(f"{what}: images are {tuple(x.shape[1:])} (C, H, W), the {info.name} data {want}")
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255)
    elif np.issubdtype(x.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if t.numel() and not (t.min() >= 0 and t.max() <= 1):
            raise DataError(f"{what}: float images must lie in [0, 1], got [{t.min():.3g}, {t.max():.3g}]")
    else:
        raise DataError(f"{what}: images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    return t


# ----------------------------------------------------------------------------- the npz dataset kind


def _channels_first(x: np.ndarray, what: str) -> np.ndarray:
    """The images of one array as (N, C, H, W) (a view), after checking dtype, layout and squareness."""
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{what} has dtype {x.dtype}: store images as uint8 (0..255, N x H x W x C) or as floats in [0, 1] (N x C x H x W)")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        last, first = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
        if last and (not first or x.dtype == np.uint8):  # ambiguous shapes follow the documented layouts
            x = x.transpose(0, 3, 1, 2)
        elif not first:
            raise DataError(f"{what} has shape {x.shape}: write uint8 images as (N, H, W, C) or floats as (N, C, H, W), with C = 1 or 3")
    else:
        raise DataError(f"{what} has shape {x.shape}: images must be (N, H, W, C), (N, C, H, W) or (N, H, W)")
    if x.shape[2] != x.shape[3]:
        raise DataError(f"{what} holds {x.shape[2]}x{x.shape[3]} (H x W) images: images must be square, resize them first")
    if len(x) == 0:
        raise DataError(f"{what} holds no images: every split needs at least one")
    return x


def _labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what} has dtype {y.dtype}: labels must be integers 0..K-1")
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{what} has shape {y.shape}: it must hold {n} labels, one per image")
    return y.astype(np.int64)


def _class_names(arrays: dict[str, np.ndarray], path: Path) -> tuple[str, ...]:
    if "classes" not in arrays:
        return ()
    names = arrays["classes"]
    if names.dtype.kind not in "US" or names.ndim != 1 or len(names) == 0:
        raise DataError(f"{path}: 'classes' must be a 1-D array of class names (strings), got dtype {names.dtype} shape {names.shape}")
    out = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    if len(set(out)) != len(out):
        raise DataError(f"{path}: 'classes' names a class twice: class names must be unique")
    return out


def load_npz(spec: DataSpec, split: str, like: DatasetInfo | None = None) -> TensorData:
    """One split of an .npz dataset (see the module's docstring). With `like` (the training data's info, e.g.
    from a checkpoint) the images must have its channels and size and the labels its classes."""
    path = Path(spec.root or "")
    hint = "data.root=FILE.npz holding arrays x_train, y_train, x_test, y_test"
    if path.is_dir():
        raise DataError(f"data.root {path} is a folder: data.name npz reads one file, {hint}")
    arrays = read_npz(path, "data.root", hint=hint)
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks array(s) {', '.join(missing)} (it has {', '.join(arrays) or 'none'}): "
                        "save x_train, y_train, x_test, y_test with numpy.savez")
    xs = {s: _channels_first(arrays[f"x_{s}"], f"{path}: x_{s}") for s in ("train", "test")}
    ys = {s: _labels(arrays[f"y_{s}"], len(xs[s]), f"{path}: y_{s}") for s in ("train", "test")}
    classes = _class_names(arrays, path)
    if like is None:
        c, size = xs["train"].shape[1], xs["train"].shape[2]
        if xs["test"].shape[1:] != xs["train"].shape[1:]:
            raise DataError(f"{path}: test images are {xs['test'].shape[1:]} (C, H, W), training images {xs['train'].shape[1:]}: "
                            "store both splits at the same size and channels")
        num_classes = len(classes) if classes else int(ys["train"].max()) + 1
        if ys["train"].min() < 0 or ys["train"].max() >= num_classes:
            why = f"'classes' names {num_classes} classes" if classes else "labels are class indices"
            raise DataError(f"{path}: y_train holds labels {ys['train'].min()}..{ys['train'].max()}, outside 0..{num_classes - 1} ({why})")
        stats_x = xs["train"] if xs["train"].dtype == np.uint8 else torch.from_numpy(xs["train"])
        mean, std, stats_from = normalization(spec, stats_x, c, where=path)
        info = DatasetInfo("npz", num_classes, c, size, mean, std, "none", len(xs["train"]), len(xs["test"]), classes, stats_from)
    else:
        info = like
        if classes and like.classes and classes != like.classes:
            raise DataError(f"{path}: its classes {list(classes[:5])}... differ from the model's {list(like.classes[:5])}...: "
                            "use the data the model was trained on")
    y = ys[split]
    if y.min() < 0 or y.max() >= info.num_classes:
        raise DataError(f"{path}: y_{split} holds labels {y.min()}..{y.max()}, outside 0..{info.num_classes - 1}: "
                        "labels must be class indices")
    if split == "test":
        unseen = sorted(set(np.unique(y).tolist()) - set(np.unique(ys["train"]).tolist()))
        if unseen:
            raise DataError(f"{path}: class {unseen[0]} occurs in y_test but never in y_train: "
                            "every test class needs training examples")
    x = images_to_tensor(xs[split], info, f"{path}: x_{split}")
    return TensorData(x, torch.from_numpy(y), info)
