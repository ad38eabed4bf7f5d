"""Tests for flatrobust.data, on tiny fixtures in torchvision's on-disk formats (tests/fixtures_data.py).

md5 checks: torchvision's CIFAR10/CIFAR100 compare every batch file and the meta file against the
md5s in the class attributes `train_list`, `test_list` and `meta["md5"]` (`_check_integrity`,
`_load_meta`), SVHN against `split_list[split][2]`; flatrobust checks Fashion-MNIST against
`data.builtin.FASHION_MNIST_MD5`. The fixture files are not the real ones, so the `trust_fixtures` helper
monkeypatches exactly those attributes with the fixtures' own md5s, for one test at a time. The
production path keeps the real md5s: `test_cifar_fixture_fails_real_md5s` proves it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100, SVHN

from flatrobust.data import builtin
from flatrobust.data import DATASETS, DataError, TensorData, augment, batches, load_dataset
from fixtures_data import (
    PIXEL_HW,
    RGB,
    fixture_md5s,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_svhn,
)

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="SVHN fixtures need scipy (pip install scipy)")


def trust_fixtures(monkeypatch, root: Path) -> None:
    """Make torchvision accept the fixture files under root (this test only; undone afterwards)."""
    md5s = fixture_md5s(root)
    for key, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        for attr, value in md5s.get(key, {}).items():
            monkeypatch.setattr(cls, attr, value)
    monkeypatch.setattr(SVHN, "split_list", md5s["svhn"])


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide the Debian package's Fashion-MNIST so only the test's root counts."""
    monkeypatch.setattr(builtin, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "no-such-dir"))


def check_tensors(td: TensorData, x_uint8: np.ndarray, y: np.ndarray) -> None:
    """Shapes, dtypes, range, exact pixel values and labels against what the fixture wrote."""
    info = td.info
    assert td.x.shape == (len(y), info.in_channels, info.image_size, info.image_size)
    assert td.x.dtype == torch.float32 and td.y.dtype == torch.int64
    assert td.x.is_contiguous()
    assert 0.0 <= td.x.min() and td.x.max() <= 1.0
    torch.testing.assert_close(td.x, torch.from_numpy(x_uint8).float() / 255, rtol=0, atol=1e-7)
    assert td.y.tolist() == y.tolist()
    # Channel order and orientation: the marker pixel sits at [c, h, w] with its RGB values.
    h, w = PIXEL_HW
    expected = torch.tensor(RGB[: info.in_channels], dtype=torch.float32) / 255
    torch.testing.assert_close(td.x[0, :, h, w], expected)


# ----------------------------------------------------------------------------- registry


def test_registry():
    assert set(DATASETS) == {"cifar10", "cifar100", "svhn", "fashion_mnist", "digits"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.in_channels
        assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
        assert info.default_augment in ("crop_flip", "none")
    assert DATASETS["cifar10"].default_augment == DATASETS["cifar100"].default_augment == "crop_flip"
    assert all(DATASETS[n].default_augment == "none" for n in ("svhn", "fashion_mnist", "digits"))
    with pytest.raises(AttributeError):
        DATASETS["cifar10"].num_classes = 3  # frozen


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist2")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")


# ----------------------------------------------------------------------------- torchvision formats


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10(tmp_path, monkeypatch, split):
    written = write_cifar10(tmp_path)
    trust_fixtures(monkeypatch, tmp_path)
    td = load_dataset("cifar10", split, root=tmp_path)
    assert td.info is DATASETS["cifar10"]
    check_tensors(td, *written[split])
    assert len(td) == (20 if split == "train" else 3)  # all five train batches, in order


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100(tmp_path, monkeypatch, split):
    written = write_cifar100(tmp_path)
    trust_fixtures(monkeypatch, tmp_path)
    td = load_dataset("cifar100", split, root=tmp_path)
    check_tensors(td, *written[split])  # labels are the fine labels


@needs_scipy
@pytest.mark.parametrize("split", ["train", "test"])
def test_svhn(tmp_path, monkeypatch, split):
    written = write_svhn(tmp_path)
    trust_fixtures(monkeypatch, tmp_path)
    td = load_dataset("svhn", split, root=tmp_path)
    check_tensors(td, *written[split])
    if split == "train":  # the file holds labels 1..10; 10 is digit 0
        assert td.y.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]


@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_torchvision_layout(tmp_path, monkeypatch, no_system_fashion, split):
    written = write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    monkeypatch.setattr(builtin, "FASHION_MNIST_MD5", written["md5"])
    check_tensors(load_dataset("fashion_mnist", split, root=tmp_path), *written[split])


def test_fashion_mnist_debian_layout(tmp_path, monkeypatch):
    """An empty root falls back to the system directory of gzipped idx files."""
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    written = write_fashion_mnist(system, gz=True)
    monkeypatch.setattr(builtin, "FASHION_MNIST_SYSTEM_DIR", str(system))
    monkeypatch.setattr(builtin, "FASHION_MNIST_MD5", written["md5"])
    check_tensors(load_dataset("fashion_mnist", "test", root=tmp_path / "empty"), *written["test"])


@pytest.mark.skipif(not Path(builtin.FASHION_MNIST_SYSTEM_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_debian_files(tmp_path):
    """The real packaged files pass the md5s written into data/builtin.py (test split: ~0.3 s)."""
    td = load_dataset("fashion_mnist", "test", root=tmp_path)
    assert td.x.shape == (DATASETS["fashion_mnist"].test_size, 1, 28, 28)
    assert sorted(td.y.unique().tolist()) == list(range(10))
    assert abs(td.x.mean().item() - DATASETS["fashion_mnist"].mean[0]) < 0.01


# ----------------------------------------------------------------------------- integrity errors


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", "CIFAR-10 not found under .*cifar-10-batches-py"),
        ("cifar100", "CIFAR-100 not found under .*cifar-100-python"),
        pytest.param("svhn", "SVHN not found under .*train_32x32.mat", marks=needs_scipy),
        ("fashion_mnist", "Fashion-MNIST not found under .*train-images-idx3-ubyte"),
    ],
)
def test_missing_dataset(tmp_path, no_system_fashion, name, expected):
    with pytest.raises(DataError, match=expected) as err:
        load_dataset(name, "train", root=tmp_path)
    assert "download=True" in str(err.value) and "\n" not in str(err.value)


def test_cifar_missing_file(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    trust_fixtures(monkeypatch, tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3 is missing"):
        load_dataset("cifar10", "train", root=tmp_path)


def test_failed_download(tmp_path, monkeypatch):
    """download=True that cannot reach the server says so, rather than "pass download=True"."""

    def offline(self):
        raise OSError("offline")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DataError, match=r"could not download CIFAR-10 into .*\(offline\)"):
        load_dataset("cifar10", "train", root=tmp_path, download=True)


def _corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_cifar_corrupted_file(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    trust_fixtures(monkeypatch, tmp_path)
    _corrupt(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    # torchvision checks all batches whichever split is asked for, so the test split fails too.
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_1 fails its md5 check") as err:
        load_dataset("cifar10", "test", root=tmp_path)
    assert "\n" not in str(err.value)


def test_cifar_fixture_fails_real_md5s(tmp_path):
    """Without the test-only patch, torchvision's real md5s are in force: fixtures are rejected."""
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="data_batch_1 fails its md5 check"):
        load_dataset("cifar10", "train", root=tmp_path)


@needs_scipy
def test_svhn_corrupted_file(tmp_path, monkeypatch):
    write_svhn(tmp_path)
    trust_fixtures(monkeypatch, tmp_path)
    _corrupt(tmp_path / "test_32x32.mat")
    with pytest.raises(DataError, match=r"test_32x32.mat fails its md5 check"):
        load_dataset("svhn", "test", root=tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_corrupted_file(tmp_path, monkeypatch, no_system_fashion, gz):
    written = write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", gz=gz)
    monkeypatch.setattr(builtin, "FASHION_MNIST_MD5", written["md5"])
    name = "t10k-labels-idx1-ubyte" + (".gz" if gz else "")
    _corrupt(tmp_path / "FashionMNIST" / "raw" / name)
    with pytest.raises(DataError, match=name.replace(".", r"\.")):  # md5 or gzip failure, file named
        load_dataset("fashion_mnist", "test", root=tmp_path)


# ----------------------------------------------------------------------------- digits


def test_digits_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    info = DATASETS["digits"]
    assert len(train) == info.train_size and len(test) == info.test_size
    assert len(train) + len(test) == 1797
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert 0.0 <= train.x.min() and train.x.max() == 1.0

    from sklearn.datasets import load_digits

    y_all = load_digits().target
    train_idx, test_idx = builtin._digits_split(y_all)
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.union1d(train_idx, test_idx).tolist() == list(range(1797))
    # Stratified: every class is ~20% test.
    frac = np.bincount(y_all[test_idx], minlength=10) / np.bincount(y_all, minlength=10)
    assert np.all(np.abs(frac - 0.2) < 0.01)
    # Deterministic: same split and the same tensors on every call.
    again = builtin._digits_split(y_all)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], test_idx)
    assert torch.equal(load_dataset("digits", "test").x, test.x)
    assert test.y.tolist() == y_all[test_idx].tolist()


def test_digits_stats_match_registry():
    x = load_dataset("digits", "train").x.double()
    assert round(x.mean().item(), 4) == DATASETS["digits"].mean[0]
    assert round(x.std(unbiased=False).item(), 4) == DATASETS["digits"].std[0]


# ----------------------------------------------------------------------------- TensorData


def test_subset_and_to():
    td = load_dataset("digits", "test")
    a, b = td.subset(50, seed=1), td.subset(50, seed=1)
    assert len(a) == 50 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(td.subset(50, seed=2).x, a.x)
    assert len(td.subset(10_000, seed=0)) == len(td)
    # The subset consists of rows of the original data, in their original order.
    rows = [int(torch.nonzero((td.x == xi).flatten(1).all(1))[0]) for xi in a.x]
    assert rows == sorted(rows)
    moved = a.to("cpu")
    assert moved.info is a.info and torch.equal(moved.x, a.x)


# ----------------------------------------------------------------------------- augment


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_shape_and_determinism():
    x = torch.rand(16, 3, 5, 7, generator=_gen(0))  # non-square catches row/column mix-ups
    out = augment(x, generator=_gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment(x, generator=_gen(1)))
    assert not torch.equal(out, augment(x, generator=_gen(2)))


def test_augment_identity():
    x = torch.rand(4, 3, 8, 8)
    assert augment(x, crop_padding=0, flip=False) is x


def test_augment_crops_are_shifted_windows():
    p, (h, w) = 2, (6, 9)
    x = torch.rand(200, 2, h, w, generator=_gen(0)) + 0.5  # no zeros inside, so padding is visible
    out = augment(x, crop_padding=p, flip=True, generator=_gen(3))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, flipped)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for flipped in (False, True)
            if torch.equal(out[i], _window(padded[i], dy, dx, h, w, flipped))
        ]
        assert len(matches) == 1, f"sample {i} is not a (flipped) window of its padded image"
        seen.add(matches[0])
    assert len(seen) > 0.8 * (2 * p + 1) ** 2 * 2  # offsets and flips both vary


def _window(img: torch.Tensor, dy: int, dx: int, h: int, w: int, flipped: bool) -> torch.Tensor:
    win = img[:, dy : dy + h, dx : dx + w]
    return win.flip(-1) if flipped else win


def test_augment_flips_about_half():
    x = torch.rand(2000, 1, 4, 4, generator=_gen(0))
    out = augment(x, crop_padding=0, flip=True, generator=_gen(5))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.all(same ^ mirrored)  # each sample is exactly one of the two
    assert 0.45 < mirrored.float().mean().item() < 0.55


# ----------------------------------------------------------------------------- batches


def test_batches():
    idx = list(batches(10, 4, shuffle=False, generator=None))
    assert [b.tolist() for b in idx] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(b) for b in batches(10, 4, shuffle=False, generator=None, drop_last=True)] == [4, 4]
    a = torch.cat(list(batches(103, 10, shuffle=True, generator=_gen(0))))
    b = torch.cat(list(batches(103, 10, shuffle=True, generator=_gen(0))))
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(103))
    assert not torch.equal(a, torch.arange(103))
    assert a.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augment_and_batches_on_gpu():
    """Everything stays on the device, driven by a generator that lives there."""
    x = torch.rand(32, 3, 8, 8, device="cuda")
    g = torch.Generator("cuda").manual_seed(0)
    out = augment(x, generator=g)
    assert out.device == x.device and out.shape == x.shape
    assert torch.equal(out, augment(x, generator=torch.Generator("cuda").manual_seed(0)))
    idx = torch.cat(list(batches(32, 5, shuffle=True, generator=g)))
    assert idx.device == x.device and sorted(idx.tolist()) == list(range(32))
    td = TensorData(x, torch.zeros(32, dtype=torch.int64, device="cuda"), DATASETS["cifar10"])
    assert torch.equal(td.subset(8, seed=0).x.cpu(), td.to("cpu").subset(8, seed=0).x)
