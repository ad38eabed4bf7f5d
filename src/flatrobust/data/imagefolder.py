"""Your own images: a folder per class (torchvision's ImageFolder layout), decoded once into a uint8 cache.

    ROOT/train/<class>/*       training images, one folder per class (nested folders allowed)
    ROOT/test/<class>/*        test images (or ROOT/val/<class>/*); its classes must occur in train/

Any format Pillow opens (by file suffix; other files and names starting with "." are skipped). Images are
decoded to RGB, resized to `image_size` x `image_size` (bilinear) when it is given, and otherwise must all
have one square size. A split whose images are all greyscale (Pillow modes 1, L, I, I;16) has one channel,
else three; `channels` (1 or 3) forces either. 16-bit greyscale is scaled to 8 bits; alpha is dropped.

The decoded split is cached as uint8 arrays in `cache_dir()` (`$FLATROBUST_CACHE/imagefolder`, default
~/.cache/flatrobust/imagefolder), under a key that hashes the folder's path, `image_size`, its class folders
and every image file's relative path, size and modification time. Listing the folder and reading each
file's metadata (no image is opened) decides between the cache and decoding, so a changed, added or
removed file gives a new key: the cache is never stale. Writing a new entry removes the older entries of
the same folder and size. Decoding runs on `DECODE_THREADS` threads (1: a pool of 2 did not pay on the
2-core machine measured, see docs/DATA.md).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import DEFAULT_ROOT, DataError, DatasetInfo, DataSpec, TensorData, normalization, to_channels, uint8_to_float

CACHE_KEY_VERSION = "v1"  # part of every cache key: bump it when decoding changes what a file becomes
DECODE_THREADS = 1  # threads that decode images: more did not pay on the 2-core machine measured (docs/DATA.md)
GREY_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N")  # Pillow's greyscale modes (LA, P count as colour)


def cache_dir() -> Path:
    """Where decoded image folders are cached: $FLATROBUST_CACHE/imagefolder (default ~/.cache/flatrobust/imagefolder)."""
    return Path(os.environ.get("FLATROBUST_CACHE") or Path.home() / ".cache" / "flatrobust") / "imagefolder"


@functools.lru_cache(maxsize=1)
def image_suffixes() -> frozenset[str]:
    """The file suffixes of every format Pillow can open here (.jpg, .png, .webp, .tif, .bmp, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def split_dir(root: Path, split: str) -> Path:
    """ROOT/train for the training split; ROOT/test, else ROOT/val, for the test split."""
    names = ("train",) if split == "train" else ("test", "val")
    for n in names:
        if (root / n).is_dir():
            _not_back_into(root / n, root)
            return root / n
    raise DataError(f"image folder {root} has no {' or '.join(n + '/' for n in names)} subfolder: "
                    f"lay it out as {root}/train/<class>/* and {root}/test/<class>/* (or val/<class>/*)")


def _not_back_into(folder: Path, tree: Path) -> None:
    """DataError when `folder` is a symbolic link that leads back into `tree` (or to a folder holding it):
    following it would read the tree's images twice, under another class or split."""
    if not folder.is_symlink():
        return
    target, top = folder.resolve(), tree.resolve()
    if target.is_relative_to(top) or top.is_relative_to(target):
        raise DataError(f"{str(folder)!r} is a link to {str(target)!r}, back into the image folder {str(tree)!r}: its images "
                        "would be read twice, under another name; remove the link")


def _walk(top: str, suffixes: frozenset[str]) -> list[tuple[tuple[str, ...], int, int]]:
    """(path parts below `top`, size, mtime_ns) of every image file under `top`, in pathlib's sorted order.

    Hidden names are skipped; symbolic links to files are followed, links to folders are not (as
    Path.rglob), so no link loop is ever entered. One scandir pass: each file's metadata is read once and no
    file is opened. A file or folder that cannot be read (a link loop, no permission) is a DataError naming it.
    """
    out = []
    stack: list[tuple[str, ...]] = [()]
    while stack:
        rel = stack.pop()
        where = os.path.join(top, *rel)
        try:
            with os.scandir(where) as it:
                for e in it:
                    name = e.name
                    if name[0] == ".":
                        continue
                    where = e.path
                    if e.is_dir(follow_symlinks=False):
                        stack.append((*rel, name))
                    elif name[name.rfind("."):].lower() in suffixes and e.is_file():
                        st = e.stat()
                        out.append(((*rel, name), st.st_size, st.st_mtime_ns))
        except OSError as e:  # e.g. ELOOP: a link to a link to ... itself
            raise DataError(f"{where!r} cannot be read ({e.strerror}): remove or fix it") from None
    out.sort(key=lambda t: t[0])  # PurePath orders by parts: the order the cache key has always used
    return out


@dataclass(frozen=True)
class Listing:
    """The image files of one split folder: `files[i]` = (path relative to `folder`, class index, size,
    modification time in ns), classes in sorted order, files sorted within each class."""

    folder: Path
    classes: list[str]
    files: list[tuple[str, int, int, int]]

    def paths(self) -> list[Path]:
        return [self.folder / rel for rel, _, _, _ in self.files]

    def labels(self) -> np.ndarray:
        return np.fromiter((c for _, c, _, _ in self.files), dtype=np.int64, count=len(self.files))


def list_images(folder: Path) -> Listing:
    """The classes (subfolders, sorted) and image files of one split folder; DataError when it holds none."""
    try:
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as e:
        raise DataError(f"{str(folder)!r} cannot be listed ({e.strerror}): check the path and its permissions") from None
    suffixes = image_suffixes()
    files = []
    for name in classes:  # a class folder may be a link to images elsewhere, never back into this tree
        _not_back_into(folder / name, folder.parent)
    for c, name in enumerate(classes):
        files += [("/".join((name, *parts)), c, size, mtime) for parts, size, mtime in _walk(str(folder / name), suffixes)]
    if not files:
        loose = any(p.is_file() and p.suffix.lower() in suffixes for p in folder.iterdir())
        where = "directly, not in class subfolders" if loose else "in class subfolders"
        raise DataError(f"{folder} holds no images {where}: put each class's images in {folder}/<class>/")
    return Listing(folder, classes, files)


def _decode_one(path: Path, image_size: int) -> tuple[np.ndarray, bool]:
    """(uint8 (H, W, 3) RGB pixels, whether the file is greyscale)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            grey = im.mode in GREY_MODES
            if im.mode.startswith("I"):  # 16/32-bit integer greyscale: scale to 8 bits
                a = np.asarray(im, dtype=np.int64)
                if a.max() > 255:
                    a = (a.clip(0, 65535) * 255 + 32767) // 65535
                im = Image.fromarray(a.astype(np.uint8), "L")
            if im.mode != "RGB":
                im = im.convert("RGB")
            if image_size:
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8), grey
    except Image.DecompressionBombError as e:  # more pixels than Pillow's limit: decoding would exhaust memory
        raise DataError(f"{str(path)!r} is refused: {_first_line(e)} (Image.MAX_IMAGE_PIXELS); shrink it or remove it") from None
    except (OSError, ValueError, SyntaxError) as e:  # Pillow raises all three for damaged or foreign files
        raise DataError(f"{str(path)!r} is not a readable image ({type(e).__name__}): remove or replace it") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:160]


def _decode_chunk(paths: list[Path], image_size: int) -> list[tuple[np.ndarray, bool]]:
    return [_decode_one(p, image_size) for p in paths]


def decode_images(files: list[Path], image_size: int, threads: int | None = None, progress: bool = False,
                  desc: str = "decoding") -> np.ndarray:
    """uint8 (N, C, H, W) of the files, in order; C = 1 when every image is greyscale, else 3 (RGB).

    With `threads` > 1 (default `DECODE_THREADS`), chunks of files are decoded on a thread pool. The result,
    and which bad file is reported, do not depend on the number of threads. `progress`: a bar on a terminal,
    else a heartbeat line every 30 s (`flatrobust.progress`).
    """
    from ..progress import Progress

    threads = threads or DECODE_THREADS
    chunk = 256
    first, out, grey = None, None, True
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    bar = Progress(total=len(files), desc=desc, unit="image", enabled=progress)
    try:
        starts = range(0, len(files), chunk)
        results = (pool.map if pool else map)(lambda i: _decode_chunk(files[i:i + chunk], image_size), starts)
        for start, decoded in zip(starts, results):
            for i, (a, g) in enumerate(decoded, start):
                if first is None:
                    first = a.shape
                    if a.shape[0] != a.shape[1]:
                        raise DataError(f"{str(files[0])!r} is {a.shape[1]}x{a.shape[0]}, not square: set data.image_size to resize every image")
                    out = np.empty((len(files), 3, *a.shape[:2]), np.uint8)
                elif a.shape != first:
                    raise DataError(f"{str(files[i])!r} is {a.shape[1]}x{a.shape[0]} but {str(files[0])!r} is {first[1]}x{first[0]}: "
                                    "set data.image_size to resize every image")
                out[i] = a.transpose(2, 0, 1)
                grey = grey and g
            bar.update(len(decoded))
    finally:
        bar.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error, decode no further chunk
    return out[:, :1] if grey else out


def _cache_key(listing: Listing, image_size: int) -> str:
    """Hash of the folder's path, image_size, class folders and each file's relative path, class, size and mtime."""
    h = hashlib.sha256(f"{CACHE_KEY_VERSION}|{listing.folder.resolve()}|{image_size}|{listing.classes}".encode())
    h.update("".join(f"{rel}|{c}|{size}|{mtime}\n" for rel, c, size, mtime in listing.files).encode())
    return h.hexdigest()[:32]


def _read_cache(path: Path, labels: np.ndarray) -> np.ndarray | None:
    """The cached images if `path` holds a complete entry for these labels, else None (it is rebuilt)."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except Exception:  # noqa: BLE001 - a missing or damaged entry is rebuilt
        return None
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(labels) or not np.array_equal(y, labels):
        return None
    return x


def _write_cache(path: Path, x: np.ndarray, y: np.ndarray, meta: dict) -> None:
    """Write an entry atomically (with a .json describing it) and remove older entries of the same folder and size."""
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        warnings.warn(f"could not cache the decoded images in {path.parent} ({e.strerror}): they will be decoded "
                      "again next time (set FLATROBUST_CACHE to a writable folder)", stacklevel=3)
        return
    for other in path.parent.glob("*.json"):
        if other.stem == path.stem:
            continue
        try:
            old = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if (old.get("folder"), old.get("image_size")) == (meta["folder"], meta["image_size"]):
            other.with_suffix(".npz").unlink(missing_ok=True)
            other.unlink(missing_ok=True)


def split_arrays(root: Path, split: str, image_size: int, progress: bool = False) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class folder names, uint8 images (N, C, H, W), labels indexing those names) of one split, decoded
    once and then read from the cache."""
    listing = list_images(split_dir(root, split))
    labels = listing.labels()
    cache = cache_dir() / f"{_cache_key(listing, image_size)}.npz"
    x = _read_cache(cache, labels) if cache.is_file() else None
    if x is None:
        x = decode_images(listing.paths(), image_size, progress=progress, desc=f"decoding {listing.folder} (first read, then cached)")
        _write_cache(cache, x, labels, {"folder": str(listing.folder.resolve()), "image_size": image_size,
                                        "images": len(labels), "shape": list(x.shape[1:]), "classes": listing.classes})
    return listing.classes, x, labels


def load_imagefolder(root: str | os.PathLike | DataSpec | None, split: str = "train", image_size: int = 0, *,
                     channels: int = 0, like: DatasetInfo | None = None, progress: bool = False) -> TensorData:
    """One split of an image folder (see the module's docstring) as float tensors in [0, 1].

    The training split defines the dataset: its class folders (sorted names), channels, size and, unless
    the spec gives `mean`/`std`, the normalization statistics. Another split is read as `like` (by default
    the training split's info): labels by class name, converted to its channels, checked against its size.
    `root` may be a `DataSpec` (then `image_size`/`channels` come from it). `progress` reports decoding.
    """
    spec = root if isinstance(root, DataSpec) else DataSpec(
        "imagefolder", None if root is None else os.fspath(root), image_size=image_size, channels=channels)
    root = Path(spec.root or DEFAULT_ROOT)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        hint = " (for arrays in an .npz file use data.name: npz)" if root.suffix == ".npz" else ""
        raise DataError(f"image folder {root} {what}: set data.root to a folder holding train/<class>/ and test/<class>/{hint}")
    if split != "train" and like is None:
        like = load_imagefolder(spec, "train", progress=progress).info
    folder_classes, x, y = split_arrays(root, split, spec.image_size, progress)
    folder = split_dir(root, split)
    if like is None:
        counts = np.bincount(y, minlength=len(folder_classes))
        empty = [c for c, n in zip(folder_classes, counts) if n == 0]
        if empty:
            raise DataError(f"{str(folder / empty[0])!r} holds no images: give every training class images, or remove the folder")
        x = to_channels(x, spec.channels)
        mean, std, stats_from = normalization(spec, x, x.shape[1], where=folder)
        try:
            test_size = len(list_images(split_dir(root, "test")).files)
        except DataError:
            test_size = 0
        info = DatasetInfo("imagefolder", len(folder_classes), x.shape[1], x.shape[-1], mean, std, "none", len(y), test_size,
                           tuple(folder_classes), stats_from)
    else:
        info = like
        present = [folder_classes[i] for i in np.unique(y)]
        unknown = [c for c in present if c not in like.classes]
        if unknown:
            raise DataError(f"{str(folder / unknown[0])!r} is a class with no training images (training classes: "
                            f"{', '.join(map(repr, like.classes[:10]))}{', ...' if len(like.classes) > 10 else ''}): add it to train/ or remove it")
        y = np.array([like.classes.index(c) if c in like.classes else -1 for c in folder_classes], dtype=np.int64)[y]
        x = to_channels(x, like.in_channels)
        if x.shape[-1] != like.image_size:
            raise DataError(f"{folder} images are {x.shape[-1]}x{x.shape[-2]}, the training images "
                            f"{like.image_size}x{like.image_size}: set data.image_size to resize both")
    return TensorData(uint8_to_float(x), torch.from_numpy(y), info)
