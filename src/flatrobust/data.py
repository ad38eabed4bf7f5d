"""Datasets as whole tensors, plus batched on-device augmentation.

The training loop keeps a whole split as one float32 tensor on the training device and
augments a batch at a time on that device: no per-sample transforms, no DataLoader workers.
Pixels stay in [0, 1]; per-channel normalization with `DatasetInfo.mean`/`.std` is the
first layer inside the model, so attacks and their eps live in pixel space.

    >>> train = load_dataset("cifar10", "train", root="./data").to("cuda")
    >>> g = torch.Generator("cuda").manual_seed(0)
    >>> for idx in batches(len(train), 128, shuffle=True, generator=g):
    ...     xb, yb = augment(train.x[idx], generator=g), train.y[idx]

Every file read is checked against a known md5 first; a missing or corrupted file raises
`DataError` with one line naming the file and the fix.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "TensorData",
    "augment",
    "batches",
    "load_dataset",
]

DEFAULT_ROOT = "./data"

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


class DataError(ValueError):
    """A dataset is missing, incomplete or corrupted; the message names the file and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    `mean`/`std` are per-channel statistics of the [0, 1] training pixels (for the model's
    Normalize layer); `train_size`/`test_size` are the sizes of the full, official splits.
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
    classes: tuple[str, ...] = ()  # class names, when the data has them (image folders)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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

_TITLES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "svhn": "SVHN",
    "fashion_mnist": "Fashion-MNIST",
    "digits": "digits",
    "imagefolder": "image folder",
}


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


def load_dataset(
    name: str,
    split: Literal["train", "test"] = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int = 0,
) -> TensorData:
    """Load a whole split of a registered dataset as CPU tensors (see `TensorData`).

    `root` (default ./data) is the torchvision root: cifar-10-batches-py/, cifar-100-python/,
    {train,test}_32x32.mat and FashionMNIST/raw/ live directly under it. Fashion-MNIST is also
    read from FASHION_MNIST_SYSTEM_DIR (Debian's dataset-fashion-mnist) when the root has none.
    `download=True` lets torchvision fetch what is missing; digits ships with scikit-learn.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "imagefolder":
        return load_imagefolder(root, split, image_size=image_size)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, imagefolder")
    info = DATASETS[name]
    root = Path(DEFAULT_ROOT if root is None else root)
    if name in ("cifar10", "cifar100"):
        x, y = _load_cifar(name, split, root, download)
    elif name == "svhn":
        x, y = _load_svhn(split, root, download)
    elif name == "fashion_mnist":
        x, y = _load_fashion_mnist(split, root, download)
    else:
        x, y = _load_digits(split)
    return TensorData(x, y, info)


def augment(
    x: torch.Tensor, *, crop_padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop (after zero padding by `crop_padding` pixels) and random horizontal flip.

    x: (N, C, H, W), any float dtype, on any device. Returns a new tensor of the same shape:
    sample i is the H x W window at a uniform offset (dy, dx) in [0, 2 * crop_padding] of its
    zero-padded image, mirrored left-right with probability 1/2 if `flip`. Pure tensor ops on
    x's device; deterministic given `generator`, which must live on x's device (None: the
    global RNG). With crop_padding=0 and flip=False, returns x itself.
    """
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if crop_padding == 0 and not flip:
        return x
    n, c, h, w = x.shape
    p = crop_padding
    dev = x.device
    offsets = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=dev)
    rows = offsets[0, :, None] + torch.arange(h, device=dev)  # (N, H): rows of the padded image
    cols = offsets[1, :, None] + torch.arange(w, device=dev)  # (N, W): columns of the padded image
    if flip:
        flipped = torch.rand(n, generator=generator, device=dev) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)  # read the window right-to-left
    # Pad once, then gather every sample's window through flat indices into the padded plane:
    # one gather for the whole batch instead of a Python loop over samples.
    padded = F.pad(x, (p, p, p, p)).flatten(2)  # (N, C, (H + 2p) * (W + 2p)), zeros outside
    flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).flatten(1)  # (N, H * W)
    out = padded.gather(2, flat[:, None, :].expand(n, c, h * w))
    return out.view(n, c, h, w)


def batches(
    n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Yield int64 index tensors covering range(n) once, in batches of `batch_size`.

    With `shuffle`, the order is a permutation drawn from `generator` (on its device; the global
    CPU RNG if None); otherwise 0..n-1 in order. `drop_last` drops a final short batch.
    """
    device = generator.device if generator is not None else "cpu"
    order = torch.randperm(n, generator=generator, device=device) if shuffle else torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


# ---------------------------------------------------------------------------------------------
# Loaders. Each returns (x float32 (N, C, H, W) in [0, 1], y int64 (N,)) on the CPU.


def _uint8_to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> contiguous float32 in [0, 1]."""
    x = torch.as_tensor(x).contiguous()  # make contiguous while still 1 byte per pixel
    return x.to(torch.float32).div_(255)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _not_found(name: str, where: str, what: str) -> DataError:
    return DataError(
        f"{_TITLES[name]} not found under {where}: pass download=True (config: data.download=true) or put {what} there"
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
                return DataError(f"could not download {_TITLES[name]} into {root} ({reason}): put {what} there by hand")
            if folder == root or not folder.exists():
                return _not_found(name, str(root), what)
            return DataError(f"{path} is missing: delete {folder} and download again (download=True)")
        if _md5(path) != md5:
            return _corrupted(path)
    # Every file checks out, so the failure was something else (e.g. a failed download).
    return DataError(f"could not load {_TITLES[name]} from {root}: {cause}".replace("\n", " "))


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


# ----------------------------------------------------------------------------- your own images: a folder per class

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _cache_dir() -> Path:
    return Path(os.environ.get("FLATROBUST_CACHE", Path.home() / ".cache" / "flatrobust")) / "imagefolder"


def _split_dir(root: Path, split: str) -> Path:
    names = ("train",) if split == "train" else ("test", "val")
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise DataError(f"image folder {root} has no {' or '.join(names)}/ subfolder: lay it out as {root}/train/<class>/*, {root}/test/<class>/*")


def _list_images(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = []
    for c, name in enumerate(classes):
        for f in sorted((folder / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, c))
    return classes, files


def _decode_images(files: list[tuple[Path, int]], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, H, W) and int64 labels; C = 1 when every image is greyscale, else 3 (RGB)."""
    from PIL import Image

    arrays, grey = [], True
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im.load()
                grey = grey and im.mode in ("1", "L", "I;16", "I")
                im = im.convert("RGB")
                if image_size:
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable image ({type(e).__name__}): remove or replace it") from None
        if arrays[-1].shape != arrays[0].shape:
            raise DataError(f"{path} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but {files[0][0]} is "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}: set data.image_size to resize every image")
    x = np.stack(arrays).transpose(0, 3, 1, 2)
    if grey:
        x = x[:, :1]
    return np.ascontiguousarray(x), np.array([c for _, c in files], dtype=np.int64)


def _imagefolder_arrays(root: Path, split: str, image_size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class names, uint8 images, labels) of one split, decoded once and cached.

    The cache key hashes every file's path, size and modification time (and `image_size`), so any change
    to the folder makes a new cache entry: a stale cache is never read.
    """
    folder = _split_dir(root, split)
    classes, files = _list_images(folder)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders: add some")
    h = hashlib.sha256(f"v1|{folder.resolve()}|{image_size}|{classes}".encode())
    for path, c in files:
        st = path.stat()
        h.update(f"{path.relative_to(folder)}|{c}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = _cache_dir() / f"{h.hexdigest()[:32]}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return classes, z["x"], z["y"]
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            pass
    x, y = _decode_images(files, image_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cache)
    return classes, x, y


def load_imagefolder(root: str | os.PathLike | None, split: str, image_size: int = 0) -> TensorData:
    """A split of a folder-per-class image tree (torchvision ImageFolder layout: ROOT/train/<class>/*,
    ROOT/test/<class>/* or ROOT/val/<class>/*). Normalization statistics come from the training split."""
    root = Path(DEFAULT_ROOT if root is None else root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: set data.root to a folder holding train/ and test/")
    classes, x, y = _imagefolder_arrays(root, "train", image_size)
    xf = torch.from_numpy(x)
    c = xf.shape[1]
    mean = tuple(float(xf[:, i].double().mean() / 255) for i in range(c))
    std = tuple(float(xf[:, i].double().std(unbiased=False) / 255) for i in range(c))
    n_train = len(y)
    if split == "test":
        test_classes, x, y = _imagefolder_arrays(root, "test", image_size)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataError(f"{_split_dir(root, 'test')}/{unknown[0]} is a class with no training images: add it to train/ or remove it")
        if x.shape[1:] != xf.shape[1:]:
            raise DataError(f"test images are {x.shape[1:]} (C, H, W), training images {tuple(xf.shape[1:])}: set data.image_size")
        y = np.array([classes.index(test_classes[v]) for v in range(len(test_classes))], dtype=np.int64)[y]
        xf = torch.from_numpy(x)
    info = DatasetInfo("imagefolder", len(classes), c, xf.shape[-1], mean, std, "none", n_train,
                       len(y) if split == "test" else 0, tuple(classes))
    return TensorData(_uint8_to_float(xf), torch.from_numpy(y), info)


# ----------------------------------------------------------------------------- RST: extra pseudo-labeled data


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


def read_npz(path: str | os.PathLike, what: str, hint: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read without pickle; DataError (one line, prefixed `what`) otherwise."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: {path} does not exist: pass {hint}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{what}: {path} is not a readable .npz (zip) file: write it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError:  # object arrays need pickle
        raise DataError(f"{what}: {path} holds pickled (object) arrays, refused for safety: save plain numeric arrays with numpy.savez") from None
    except Exception as e:  # noqa: BLE001 - damaged members become one line
        raise DataError(f"{what}: {path} is not a readable .npz ({type(e).__name__}): write it with numpy.savez") from None


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


def mixed_batch_sizes(batch_size: int, extra_fraction: float) -> tuple[int, int]:
    """(labeled, extra) examples per batch: round(batch_size * extra_fraction) extra, at least one labeled."""
    n_extra = min(int(round(batch_size * extra_fraction)), batch_size - 1)
    return batch_size - n_extra, n_extra


def mixed_batches(
    n_labeled: int, n_extra: int, batch_size: int, extra_fraction: float, *, generator: torch.Generator | None,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """One epoch of RST batches as index tensors into cat([labeled, extra]).

    Every labeled example appears once per epoch (shuffled, as `batches`); each batch is completed with
    extra examples (indices n_labeled + j) drawn without replacement from a shuffled order of the extra
    data, reshuffled whenever it runs out. Deterministic given `generator`.
    """
    per_lab, per_extra = mixed_batch_sizes(batch_size, extra_fraction)
    labeled = list(batches(n_labeled, per_lab, shuffle=True, generator=generator, drop_last=drop_last))
    device = generator.device if generator is not None else "cpu"
    need = len(labeled) * per_extra
    orders = [torch.randperm(n_extra, generator=generator, device=device) for _ in range(-(-need // n_extra))] if per_extra else []
    pool = torch.cat(orders) + n_labeled if orders else torch.empty(0, dtype=torch.int64, device=device)
    out, used = [], 0
    for lab in labeled:  # a short last batch gets extra examples in proportion
        k = per_extra if len(lab) == per_lab else int(round(len(lab) * per_extra / per_lab))
        out.append(torch.cat([lab, pool[used:used + k]]))
        used += k
    return out
