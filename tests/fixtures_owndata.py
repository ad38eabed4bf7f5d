"""Tiny image folders and .npz datasets written by the tests themselves (never ../shared/data).

`write_folder` lays out ROOT/<split>/<class>/<i>.<ext> with random pixels and returns what it wrote, so tests
can compare what flatrobust reads back with the pixels on disk (lossless formats are compared exactly).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "emu")


def write_image(path: Path, pixels: np.ndarray, fmt: str | None = None) -> None:
    """pixels uint8 (H, W) greyscale or (H, W, 3) RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lossless = {"lossless": True} if path.suffix == ".webp" else {}  # WebP is lossy by default
    Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB").save(path, format=fmt, **lossless)


def write_folder(root: Path, per_class: dict[str, dict[str, int]] | None = None, size: int = 8, grey: bool = False,
                 ext: str = "png", seed: int = 0, test_dir: str = "test") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ROOT/train/<class>/*.ext and ROOT/<test_dir>/<class>/*.ext.

    per_class: {split: {class: count}}, default 6 training and 2 test images for each of CLASSES.
    Returns {split: (uint8 images (N, C, H, W) in the order flatrobust reads them, labels (N,))}, labels
    indexing the sorted training class names.
    """
    per_class = per_class or {"train": dict.fromkeys(CLASSES, 6), test_dir: dict.fromkeys(CLASSES, 2)}
    rng = np.random.default_rng(seed)
    classes = sorted(per_class["train"])
    out = {}
    for split, counts in per_class.items():
        xs, ys = [], []
        for name in sorted(counts):
            for i in range(counts[name]):
                px = rng.integers(0, 256, (size, size) if grey else (size, size, 3), dtype=np.uint8)
                write_image(root / split / name / f"{i:03d}.{ext}", px)
                xs.append(px[None] if grey else px.transpose(2, 0, 1))
                ys.append(classes.index(name) if name in classes else -1)
        out["test" if split != "train" else "train"] = (np.stack(xs) if xs else np.zeros((0,)), np.array(ys, dtype=np.int64))
    return out


def write_npz(path: Path, n_train: int = 24, n_test: int = 8, size: int = 8, channels: int = 3, num_classes: int = 3,
              layout: str = "uint8", seed: int = 0, **overrides) -> dict[str, np.ndarray]:
    """An .npz dataset: layout "uint8" (N, H, W, C), "float" (N, C, H, W) in [0, 1], or "grey" uint8 (N, H, W).
    `overrides` replace or add arrays (None removes one). Returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
        if layout == "float":
            x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255
        elif layout == "grey":
            x = x[..., 0]
        arrays[f"x_{split}"] = x
        arrays[f"y_{split}"] = np.arange(n) % num_classes
    for k, v in overrides.items():
        if v is None:
            arrays.pop(k, None)
        else:
            arrays[k] = v
    np.savez(path, **arrays)
    return arrays
