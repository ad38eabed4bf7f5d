"""Robust self-training (RST): the extra pseudo-labeled images of `data.extra`, mixed into every batch."""
from __future__ import annotations

import os

import numpy as np
import torch

from .arrays import images_to_tensor, read_npz
from .base import DataError, TensorData


def load_extra(path: str | os.PathLike, like: TensorData) -> TensorData:
    """Extra pseudo-labeled images for RST: an .npz with `x` (images) and `y` (labels), read without pickle.

    The images must have the labeled data's channels and size, the labels its classes.
    """
    arrays = read_npz(path, "data.extra", hint="an .npz with arrays x and y (e.g. from `flatrobust pseudolabel`)")
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"data.extra: {path} must hold arrays 'x' (images) and 'y' (labels), it has {', '.join(arrays) or 'none'}")
    x_np, y_np = arrays["x"], arrays["y"]
    x = images_to_tensor(x_np, like.info, f"data.extra {path}")
    if y_np.ndim != 1 or len(y_np) != len(x) or not np.issubdtype(y_np.dtype, np.integer):
        raise DataError(f"data.extra: 'y' of {path} must be {len(x)} integer labels, got shape {y_np.shape} dtype {y_np.dtype}")
    if len(y_np) and (y_np.min() < 0 or y_np.max() >= like.info.num_classes):
        raise DataError(f"data.extra: labels of {path} must lie in 0..{like.info.num_classes - 1}, got {y_np.min()}..{y_np.max()}")
    if len(x) == 0:
        raise DataError(f"data.extra: {path} holds no images")
    return TensorData(x, torch.from_numpy(y_np.astype(np.int64)), like.info)
