"""The built-in datasets, read from torchvision's on-disk formats (or scikit-learn, for digits).

`DATASETS` holds their static facts. `data.root` is the torchvision root: cifar-10-batches-py/,
cifar-100-python/, {train,test}_32x32.mat and FashionMNIST/raw/ live directly under it. Fashion-MNIST is
also read from FASHION_MNIST_SYSTEM_DIR (Debian's dataset-fashion-mnist) when the root has none.
`download=True` lets torchvision fetch what is missing; digits ships with scikit-learn.

Every file read is checked against a known md5 first; a missing or corrupted file raises `DataError`
with one line naming the file and the fix.
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import DEFAULT_ROOT, DataError, DatasetInfo, uint8_to_float as _uint8_to_float

# Where the Debian package `dataset-fashion-mnist` installs Fashion-MNIST: the four upstream
# files, gzipped, side by side (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
# t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz). Searched when the root has no copy.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

# md5 of the *uncompressed* Fashion-MNIST idx files. We check the decompressed bytes rather than
# the .gz because Debian recompressed the files (its gzip headers carry a 2020-06-05 mtime), so the
# published .gz md5s (torchvision's FashionMNIST.resources, checked by torchvision on download) do
# not match the packaged .gz files, while the content does. Computed with `zcat FILE.gz | md5sum`
# over dataset-fashion-mnist 0.0~git20200523.55506a9-1; they equal the md5s of the gunzipped
# upstream files as published by other projects.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}

# digits has no official split: a stratified 80/20 split, drawn per class with this seed (see
# `_digits_split`), so that train and test never overlap and are the same on every machine.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), "crop_flip", 50000, 10000
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip", 50000, 10000
    ),
    # Flips would turn digits into other glyphs, and crops are not the usual SVHN recipe.
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "none", 73257, 26032),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), "none", 60000, 10000),
    # mean/std: numpy mean and (population) std over all pixels of the 1438 training images of
    # our split, after dividing by 16 (load_digits()'s values are 0..16).
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3058,), (0.3766,), "none", 1438, 359),
}

# The built-in sets that read no file (scikit-learn ships digits): their data.root means nothing.
WITHOUT_FILES = ("digits",)

TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "fashion_mnist": "Fashion-MNIST", "digits": "digits"}


def load_builtin(name: str, split: str, root: str | Path | None = None, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 (N, C, H, W) in [0, 1], y int64 (N,)) of one split of a built-in dataset, on the CPU."""
    root = Path(DEFAULT_ROOT if root is None else root)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, split, root, download)
    if name == "svhn":
        return _load_svhn(split, root, download)
    if name == "fashion_mnist":
        return _load_fashion_mnist(split, root, download)
    if name == "digits":
        return _load_digits(split)
    raise ValueError(f"{name!r} is not a built-in dataset; known: {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Loaders. Each returns (x float32 (N, C, H, W) in [0, 1], y int64 (N,)) on the CPU.

def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _not_found(name: str, where: str, what: str) -> DataError:
    return DataError(
        f"{TITLES[name]} not found under {where}: pass download=True (config: data.download=true) or put {what} there"
    )


def _corrupted(path: Path | str) -> DataError:
    return DataError(f"{path} fails its md5 check (corrupted?): delete it and download again")


def _diagnose(
    name: str, root: Path, folder: Path, files: list[tuple[str, str]], cause: Exception, download: bool
) -> DataError:
    """Turn torchvision's generic "not found or corrupted" (or a failed download) into a message
    naming the bad file.

    `files` are (file name in `folder`, expected md5) straight from the torchvision class, so the
    check is exactly the one torchvision made.
    """
    for fname, md5 in files:
        path = folder / fname
        if not path.exists():
            what = fname if folder == root else folder.name
            if download:  # asked for, and it failed (offline, server down, bad archive)
                reason = str(cause).replace("\n", " ")
                return DataError(f"could not download {TITLES[name]} into {root} ({reason}): put {what} there by hand")
            if folder == root or not folder.exists():
                return _not_found(name, str(root), what)
            return DataError(f"{path} is missing: delete {folder} and download again (download=True)")
        if _md5(path) != md5:
            return _corrupted(path)
    # Every file checks out, so the failure was something else (e.g. a failed download).
    return DataError(f"could not load {TITLES[name]} from {root}: {cause}".replace("\n", " "))


def _load_cifar(name: str, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        # torchvision checks the md5 of every batch file and the meta file before reading.
        ds = cls(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as e:  # OSError: a failed download
        files = [(f, m) for f, m in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]
        raise _diagnose(name, root, root / cls.base_folder, files, e, download) from e
    x = _uint8_to_float(torch.from_numpy(ds.data).permute(0, 3, 1, 2))  # torchvision keeps (N, H, W, C)
    return x, torch.as_tensor(ds.targets, dtype=torch.int64)


def _load_svhn(split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import SVHN

    try:
        import scipy.io  # noqa: F401  (torchvision reads the .mat files with scipy)
    except ImportError as e:
        raise DataError("SVHN needs scipy to read its .mat files: pip install scipy") from e
    try:
        ds = SVHN(str(root), split=split, download=download)  # checks the .mat file's md5
    except (RuntimeError, OSError) as e:
        _, fname, md5 = SVHN.split_list[split]
        raise _diagnose("svhn", root, root, [(fname, md5)], e, download) from e
    # ds.data is already (N, 3, 32, 32); torchvision has already mapped label 10 (digit 0) to 0.
    return _uint8_to_float(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64)


def _read_idx(path: Path) -> torch.Tensor:
    """Read an idx file (raw, or gzipped if the name ends in .gz) after checking its md5.

    idx layout: 2 zero bytes, a type code (0x08 = uint8), the number of dims d, then d big-endian
    int32 sizes, then the data in C order. The md5 is over the uncompressed bytes.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} cannot be read or decompressed (corrupted?): delete it and download again") from e
    if hashlib.md5(raw).hexdigest() != FASHION_MNIST_MD5[path.name.removesuffix(".gz")]:
        raise _corrupted(path)
    ndim = raw[3]
    if raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not a uint8 idx file: delete it and download again")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: delete it and download again")
    return torch.from_numpy(data.reshape(shape).copy())  # copy: frombuffer views are read-only


def _find_idx(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _load_fashion_mnist(split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    # torchvision's layout under the root first, then the Debian package's flat directory of .gz.
    raw_dir = root / "FashionMNIST" / "raw"
    folders = [raw_dir, Path(FASHION_MNIST_SYSTEM_DIR)]
    found = None
    for folder in folders:
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            found = paths
            break
    if found is None and download:
        from torchvision.datasets import FashionMNIST

        try:  # torchvision checks each .gz against its published md5 and unpacks into raw_dir
            FashionMNIST(str(root), train=split == "train", download=True)
        except (RuntimeError, OSError) as e:
            raise DataError(f"could not download Fashion-MNIST into {raw_dir}: {e}".replace("\n", " ")) from e
        found = [_find_idx(raw_dir, s) for s in stems]
    if found is None or not all(found):
        raise _not_found(
            "fashion_mnist",
            f"{raw_dir} or {FASHION_MNIST_SYSTEM_DIR}",
            f"{stems[0]}[.gz] and {stems[1]}[.gz] (or apt-get install dataset-fashion-mnist)",
        )
    images, labels = (_read_idx(p) for p in found)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"{found[0]} and {found[1]} do not match in shape: delete them and download again")
    return _uint8_to_float(images[:, None]), labels.to(torch.int64)  # add the channel dim


def _digits_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 80/20 split of indices: per class, a seeded permutation's first
    round(0.2 * class size) indices go to test. numpy's legacy RandomState stream is frozen,
    so the split is the same on every machine. Returns sorted (train_idx, test_idx)."""
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test = []
    for c in np.unique(y):  # 10 classes, not a loop over samples
        idx = np.flatnonzero(y == c)
        test.append(idx[rng.permutation(len(idx))][: int(round(DIGITS_TEST_FRACTION * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    return train_idx, test_idx


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()  # data: (1797, 64) float64 with values 0..16; target: (1797,)
    train_idx, test_idx = _digits_split(d.target)
    idx = train_idx if split == "train" else test_idx
    x = torch.as_tensor(d.data[idx] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    return x, torch.as_tensor(d.target[idx], dtype=torch.int64)

