"""Tiny datasets written in torchvision's on-disk formats, for tests that cannot download.

Each writer fills a root directory the way torchvision (or the Debian package) lays the real data
out and returns the uint8 images (N, C, H, W) and int64 labels it wrote, so tests can compare
what `flatrobust.data.load_dataset` reads back with what is on disk.

The fixture files are not the real files, so their md5s differ from the ones torchvision and
flatrobust check. `fixture_md5s` computes theirs, for tests to patch in (and only for fixtures).
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np

# A pixel with a known, channel-distinct value, written into image 0 of every fixture so tests can
# check channel order and orientation: image 0 has value RGB[c] at [c, PIXEL_HW[0], PIXEL_HW[1]].
PIXEL_HW = (1, 2)
RGB = (10, 20, 30)


def _images(rng: np.random.Generator, n: int, c: int, size: int) -> np.ndarray:
    """Random uint8 images (n, c, size, size), image 0 carrying the marker pixel."""
    x = rng.integers(0, 256, (n, c, size, size), dtype=np.uint8)
    h, w = PIXEL_HW
    x[0, :, h, w] = RGB[:c]
    return x


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _pickle(path: Path, obj: dict) -> None:
    # The real batches are Python 2 pickles that torchvision reads with encoding="latin1", which
    # gives str keys; a protocol-2 pickle with str keys reads back identically.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 3, seed: int = 0) -> dict:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}.

    Each batch is {"data": uint8 (N, 3072) with rows R(1024) G(1024) B(1024), each row-major
    32x32, "labels": list of int}. Returns {"train": (x, y), "test": (x, y)} with x (N, 3, 32, 32).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, names, n in (
        ("train", [f"data_batch_{i}" for i in range(1, 6)], per_batch),
        ("test", ["test_batch"], n_test),
    ):
        xs, ys = [], []
        for name in names:
            x = _images(rng, n, 3, 32)
            y = rng.integers(0, 10, n)
            _pickle(folder / name, {"batch_label": name, "labels": y.tolist(), "data": x.reshape(n, 3072), "filenames": []})
            xs.append(x)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys).astype(np.int64))
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch})
    return out


def write_cifar100(root: Path, n_train: int = 6, n_test: int = 3, seed: int = 1) -> dict:
    """root/cifar-100-python/{train, test, meta}; batches carry "fine_labels" and "coarse_labels"."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 3, 32)
        fine = rng.integers(0, 100, n)
        _pickle(
            folder / split,
            {"data": x.reshape(n, 3072), "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist()},
        )
        out[split] = (x, fine.astype(np.int64))
    _pickle(
        folder / "meta",
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]},
    )
    return out


def write_svhn(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 2) -> dict:
    """root/{train,test}_32x32.mat with X uint8 (32, 32, 3, N) and y uint8 (N, 1) in 1..10 (10 = digit 0).

    Every label 1..10 occurs in the train file. Returns labels as digits (10 mapped to 0).
    """
    import scipy.io

    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 3, 32)
        y = (np.arange(n) % 10 + 1).astype(np.uint8)  # 1..10, so 10 is present
        scipy.io.savemat(Path(root) / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": y[:, None]})
        out[split] = (x, np.where(y == 10, 0, y).astype(np.int64))
    return out


def _idx_bytes(a: np.ndarray) -> bytes:
    """idx format: 0, 0, type 0x08 (uint8), ndim, then ndim big-endian int32 sizes, then the data."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}i", *a.shape) + a.astype(np.uint8).tobytes()


def write_fashion_mnist(folder: Path, n_train: int = 7, n_test: int = 4, gz: bool = False, seed: int = 3) -> dict:
    """The four idx files, flat in `folder`: raw (torchvision's FashionMNIST/raw layout) or, with
    gz=True, gzipped like the Debian package (/usr/share/datasets/fashion-mnist/*.gz).

    Returns {"train": (x (N, 1, 28, 28), y), "test": ...} and, under "md5", the md5 of each file's
    uncompressed bytes keyed by the uncompressed name (the form of FASHION_MNIST_MD5).
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"md5": {}}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = _images(rng, n, 1, 28)
        y = rng.integers(0, 10, n).astype(np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", x[:, 0]), (f"{prefix}-labels-idx1-ubyte", y)):
            raw = _idx_bytes(arr)
            out["md5"][stem] = hashlib.md5(raw).hexdigest()
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / stem).write_bytes(raw)
        out[split] = (x, y.astype(np.int64))
    return out


def fixture_md5s(root: Path) -> dict:
    """md5 lists in the shape of torchvision's class attributes, for the fixture files under root.

    Keys: "cifar10"/"cifar100" -> {"train_list", "test_list", "meta"}; "svhn" -> split_list.
    Only entries whose fixture files exist are filled in.
    """
    from torchvision.datasets import CIFAR10, CIFAR100, SVHN

    root = Path(root)
    out = {}
    for key, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        folder = root / cls.base_folder
        if folder.exists():
            out[key] = {
                "train_list": [[f, md5(folder / f)] for f, _ in cls.train_list],
                "test_list": [[f, md5(folder / f)] for f, _ in cls.test_list],
                "meta": {**cls.meta, "md5": md5(folder / cls.meta["filename"])},
            }
    split_list = {}
    for split, (url, fname, real_md5) in SVHN.split_list.items():
        path = root / fname
        split_list[split] = [url, fname, md5(path) if path.exists() else real_md5]
    out["svhn"] = split_list
    return out
