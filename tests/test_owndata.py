"""Your own data: the dataset registry, image folders (with their cache) and .npz arrays, bad data through the
CLI (one line, exit 2, no run directory), and every command on runs trained on such data. The tests build
their own tiny folders and arrays (tests/fixtures_owndata.py)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flatrobust import models
from flatrobust.cli import main
from flatrobust.config import load_config
from flatrobust.data import (
    DATASETS, REGISTRY, DataError, DatasetInfo, DataSpec, cache_dir, dataset_info, load_dataset, load_split,
)
from flatrobust.data import imagefolder as imagefolder_module
from flatrobust.data.registry import OPTIONS
from fixtures_owndata import CLASSES, write_folder, write_image, write_npz

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test gets an empty cache folder (FLATROBUST_CACHE), never the user's."""
    monkeypatch.setenv("FLATROBUST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "imagefolder"


def folder_spec(root, **kw):
    return DataSpec("imagefolder", str(root), **kw)


# ----------------------------------------------------------------------------- the registry


def test_registry_is_one_mechanism():
    """Built-in sets and the imagefolder / npz kinds are entries of one registry, each accepted by the config."""
    assert set(REGISTRY) == set(DATASETS) | {"imagefolder", "npz"}
    for name, source in REGISTRY.items():
        assert source.name == name and source.title and source.root
        assert source.info is DATASETS.get(name)  # fixed facts exactly for the built-in sets
        assert source.options <= set(OPTIONS)
        assert load_config(None, [f"data.name={name}"]).data.name == name
    with pytest.raises(Exception, match=r"data.name must be one of .*\(did you mean 'imagefolder'\?\)"):
        load_config(None, ["data.name=imagefoldr"])


@pytest.mark.parametrize("name, option", [(n, o) for n in REGISTRY for o in OPTIONS if o not in REGISTRY[n].options])
def test_options_a_source_does_not_take_are_refused(tmp_path, name, option):
    value = {"download": True, "image_size": 8, "channels": 1}[option]
    with pytest.raises(DataError, match=f"data.{option} applies to .*not to {name}") as err:
        load_split(DataSpec(name, str(tmp_path), **{option: value}), "train")
    assert "\n" not in str(err.value)


def test_recipe_normalization_replaces_a_builtin_sets():
    info = dataset_info({"name": "digits", "mean": [0.5], "std": [0.25]})
    assert (info.mean, info.std, info.stats_from) == ((0.5,), (0.25,), "recipe")
    assert dataset_info({"name": "digits"}) is DATASETS["digits"]
    with pytest.raises(DataError, match=r"need 1 value\(s\) each"):
        load_split({"name": "digits", "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "test")


def test_dataset_info_round_trip_and_old_dicts():
    info = DatasetInfo("imagefolder", 3, 3, 8, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "none", 18, 6, CLASSES, "recipe")
    assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    old = {k: v for k, v in info.to_dict().items() if k != "stats_from"} | {"field_of_the_future": 1}
    assert DatasetInfo.from_dict(old).stats_from == "training split"  # what image folders always used before


# ----------------------------------------------------------------------------- image folders


def test_imagefolder_reads_pixels_labels_classes_and_statistics(tmp_path):
    written = write_folder(tmp_path / "d")
    train = load_split(folder_spec(tmp_path / "d"), "train")
    test = load_split(folder_spec(tmp_path / "d"), "test", like=train.info)
    for td, split in ((train, "train"), (test, "test")):
        x, y = written[split]
        torch.testing.assert_close(td.x, torch.from_numpy(x).float() / 255, rtol=0, atol=0)  # png: exact
        assert td.y.tolist() == y.tolist() and td.y.dtype == torch.int64
    info = train.info
    assert test.info == info
    assert (info.name, info.classes, info.num_classes, info.in_channels, info.image_size) == ("imagefolder", CLASSES, 3, 3, 8)
    assert (info.train_size, info.test_size, info.stats_from, info.default_augment) == (18, 6, "training split", "none")
    x = written["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(info.mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(info.std, x.std(axis=(0, 2, 3)), rtol=1e-12)
    # load_dataset and a test split read alone (info from the training split) give the same
    alone = load_dataset("imagefolder", "test", root=tmp_path / "d")
    assert torch.equal(alone.x, test.x) and torch.equal(alone.y, test.y) and alone.info == info


def test_val_folder_nested_files_and_skipped_names(tmp_path):
    root = tmp_path / "d"
    written = write_folder(root, test_dir="val")
    rng = np.random.default_rng(1)
    write_image(root / "train" / "cat" / "more" / "deep.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"junk, skipped because hidden")
    (root / "train" / ".cache").mkdir()
    train = load_split(folder_spec(root), "train")
    assert train.info.classes == CLASSES and len(train) == 19  # 18 + the nested one
    assert train.y.tolist() == [0] * 7 + [1] * 6 + [2] * 6
    test = load_split(folder_spec(root), "test", like=train.info)
    assert torch.equal(test.x, torch.from_numpy(written["test"][0]).float() / 255)


def test_test_split_with_fewer_classes_keeps_training_labels(tmp_path):
    write_folder(tmp_path / "d", {"train": dict.fromkeys(CLASSES, 2), "test": {"emu": 2}})
    (tmp_path / "d" / "test" / "cat").mkdir()  # an empty test class folder is fine
    test = load_split(folder_spec(tmp_path / "d"), "test")
    assert test.y.tolist() == [2, 2] and test.info.classes == CLASSES


@pytest.mark.parametrize("ext", ["jpg", "bmp", "gif", "tiff", "webp", "ppm"])
def test_any_format_pillow_reads(tmp_path, ext):
    written = write_folder(tmp_path / "d", ext=ext, grey=ext == "gif")  # gif: 256 colours at most, so greyscale
    train = load_split(folder_spec(tmp_path / "d"), "train")
    x = torch.from_numpy(written["train"][0]).float() / 255
    if ext == "gif":  # Pillow reads a GIF as a palette image (mode P), which counts as colour: the grey is repeated
        x = x.expand(-1, 3, -1, -1)
    if ext == "jpg":  # lossy: close, not equal
        assert train.x.shape == x.shape and (train.x - x).abs().mean() < 0.2
    else:
        assert torch.equal(train.x, x)


def test_greyscale_rgb_and_forced_channels(tmp_path):
    grey = write_folder(tmp_path / "g", grey=True)
    td = load_split(folder_spec(tmp_path / "g"), "train")
    assert td.info.in_channels == 1 and torch.equal(td.x, torch.from_numpy(grey["train"][0]).float() / 255)
    rgb = load_split(folder_spec(tmp_path / "g", channels=3), "train")
    assert rgb.info.in_channels == 3 and torch.equal(rgb.x, td.x.expand(-1, 3, -1, -1))
    # a folder mixing one RGB image into greyscale ones is RGB; channels=1 gives Pillow's own grey values
    px = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    write_image(tmp_path / "g" / "train" / "cat" / "zzz_colour.png", px)
    mixed = load_split(folder_spec(tmp_path / "g"), "train")
    assert mixed.info.in_channels == 3
    forced = load_split(folder_spec(tmp_path / "g", channels=1), "train")
    i = 6  # the colour image: last of class cat (index 0), after its 6 greyscale images
    expected = np.array(Image.fromarray(px).convert("L"))
    assert torch.equal(forced.x[i, 0], torch.from_numpy(expected).float() / 255)
    assert forced.info.in_channels == 1 and forced.info.mean != mixed.info.mean[:1]


def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path):
    for c in CLASSES:
        for i in range(2):
            path = tmp_path / "d" / "train" / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4), 65535 if i else 257 * 100, np.uint16)).save(path)
    td = load_split(folder_spec(tmp_path / "d"), "train")
    assert td.info.in_channels == 1
    assert sorted(set(td.x.flatten().mul(255).round().tolist())) == [100.0, 255.0]


def test_image_size_resizes_mixed_sizes(tmp_path):
    rng = np.random.default_rng(2)
    sizes = {"cat": (12, 12), "dog": (9, 16), "emu": (30, 20)}
    images = {}
    for c, (h, w) in sizes.items():
        for split in ("train", "test"):
            images[split, c] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            write_image(tmp_path / "d" / split / c / "a.png", images[split, c])
    with pytest.raises(DataError, match=r"dog/a.png' is 16x9 but .*cat/a.png' is 12x12: set data.image_size"):
        load_split(folder_spec(tmp_path / "d"), "train")
    td = load_split(folder_spec(tmp_path / "d", image_size=10), "train")
    assert td.x.shape == (3, 3, 10, 10) and td.info.image_size == 10
    expected = np.array(Image.fromarray(images["train", "emu"]).resize((10, 10), Image.BILINEAR))
    assert torch.equal(td.x[2], torch.from_numpy(expected.transpose(2, 0, 1).copy()).float() / 255)


def test_recipe_normalization_for_a_folder(tmp_path):
    write_folder(tmp_path / "d")
    info = load_split(folder_spec(tmp_path / "d", mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.4)), "train").info
    assert (info.mean, info.std, info.stats_from) == ((0.5, 0.5, 0.5), (0.2, 0.3, 0.4), "recipe")
    with pytest.raises(DataError, match=r"need 3 value\(s\) each, one per channel of the RGB images"):
        load_split(folder_spec(tmp_path / "d", mean=(0.5,), std=(0.2,)), "train")


# ----------------------------------------------------------------------------- the cache


def _count_opens(monkeypatch):
    opened = []
    real = Image.open

    def counting(fp, *a, **kw):
        opened.append(str(fp))
        return real(fp, *a, **kw)

    monkeypatch.setattr(Image, "open", counting)
    return opened


def _no_opens(monkeypatch):
    def refuse(fp, *a, **kw):
        raise AssertionError(f"opened {fp}: the cache should have been used")

    monkeypatch.setattr(Image, "open", refuse)


def test_cache_is_used_and_notices_every_change(tmp_path, monkeypatch, own_cache):
    root = tmp_path / "d"
    write_folder(root)
    opened = _count_opens(monkeypatch)
    first = load_split(folder_spec(root), "train")
    assert len(opened) == 18 and len(list(own_cache.glob("*.npz"))) == 1

    _no_opens(monkeypatch)  # unchanged: not one image file is opened
    again = load_split(folder_spec(root), "train")
    assert torch.equal(again.x, first.x) and again.info == first.info

    # modify a file (new pixels, new size on disk): re-decoded, the new pixels are read
    monkeypatch.undo()
    monkeypatch.setenv("FLATROBUST_CACHE", str(own_cache.parent))
    px = np.zeros((8, 8, 3), np.uint8)
    write_image(root / "train" / "dog" / "002.png", px)
    opened = _count_opens(monkeypatch)
    changed = load_split(folder_spec(root), "train")
    assert len(opened) == 18 and changed.x[8].sum() == 0 and not torch.equal(changed.x, first.x)

    # same content, only the modification time changes: still a new key (metadata decides, no file is read)
    st = os.stat(root / "train" / "dog" / "002.png")
    os.utime(root / "train" / "dog" / "002.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    opened.clear()
    load_split(folder_spec(root), "train")
    assert len(opened) == 18

    opened.clear()  # add a file
    write_image(root / "train" / "emu" / "100.png", px)
    assert len(load_split(folder_spec(root), "train")) == 19 and len(opened) == 19
    opened.clear()  # remove a file
    (root / "train" / "cat" / "000.png").unlink()
    removed = load_split(folder_spec(root), "train")
    assert len(removed) == 18 and len(opened) == 18 and removed.y.tolist().count(0) == 5
    # writing a new entry removed the older ones of this folder: one entry per folder and size
    assert len(list(own_cache.glob("*.npz"))) == 1 and len(list(own_cache.glob("*.json"))) == 1
    load_split(folder_spec(root, image_size=4), "train")  # another size is another entry, kept beside it
    assert len(list(own_cache.glob("*.npz"))) == 2


def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch, own_cache):
    write_folder(tmp_path / "d")
    first = load_split(folder_spec(tmp_path / "d"), "train")
    (entry,) = own_cache.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    opened = _count_opens(monkeypatch)
    assert torch.equal(load_split(folder_spec(tmp_path / "d"), "train").x, first.x) and len(opened) == 18


def test_cache_key_is_the_one_existing_runs_used(tmp_path, monkeypatch, own_cache):
    """The key (v1: folder, image_size, class folders, each file's path, class, size and mtime) is unchanged, so
    runs started before this version re-read their cache on resume instead of decoding again."""
    root = tmp_path / "d"
    write_folder(root)
    folder = root / "train"
    classes = sorted(p.name for p in folder.iterdir())
    h = hashlib.sha256(f"v1|{folder.resolve()}|0|{classes}".encode())
    labels = []
    for c, name in enumerate(classes):
        for f in sorted((folder / name).rglob("*")):
            st = f.stat()
            h.update(f"{f.relative_to(folder)}|{c}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            labels.append(c)
    own_cache.mkdir(parents=True)
    marker = (np.arange(len(labels) * 3 * 64) % 7).astype(np.uint8).reshape(len(labels), 3, 8, 8)  # the "old" entry
    np.savez(own_cache / f"{h.hexdigest()[:32]}.npz", x=marker, y=np.array(labels))
    _no_opens(monkeypatch)
    assert torch.equal(load_split(folder_spec(root), "train").x, torch.from_numpy(marker).float() / 255)


def test_decoding_threads_do_not_change_the_result(tmp_path):
    written = write_folder(tmp_path / "d", {"train": {"cat": 300, "dog": 3}})
    files = imagefolder_module.list_images(tmp_path / "d" / "train").paths()
    one = imagefolder_module.decode_images(files, 0, threads=1)
    assert np.array_equal(one, written["train"][0])
    assert np.array_equal(imagefolder_module.decode_images(files, 0, threads=3), one)


def test_first_read_reports_progress_unless_quiet(tmp_path, monkeypatch, capsys):
    from flatrobust import progress as progress_module

    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.002)
    write_folder(tmp_path / "d", {"train": {"cat": 200, "dog": 200}, "test": {"cat": 2, "dog": 2}}, size=16)
    load_split(folder_spec(tmp_path / "d"), "train", progress=True)
    err = capsys.readouterr().err
    assert f"[flatrobust] decoding {tmp_path / 'd' / 'train'} (first read, then cached): " in err and "image" in err
    load_split(folder_spec(tmp_path / "d"), "test", progress=False)  # decodes the test split: nothing said
    assert capsys.readouterr().err == ""
    (tmp_path / "d" / "train" / "cat" / "000.png").unlink()  # a new first read, through a --quiet training run
    assert _train_cli(tmp_path, "data.name=imagefolder", f"data.root={tmp_path / 'd'}", "data.train_subset=16") == 0
    assert capsys.readouterr().err == ""


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    write_folder(tmp_path / "d")
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv("FLATROBUST_CACHE", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="could not cache"):
        assert len(load_split(folder_spec(tmp_path / "d"), "train")) == 18
    assert cache_dir() == tmp_path / "file" / "imagefolder"


# ----------------------------------------------------------------------------- npz


@pytest.mark.parametrize("layout, channels", [("uint8", 3), ("float", 3), ("grey", 1), ("uint8", 1)])
def test_npz_layouts(tmp_path, layout, channels):
    arrays = write_npz(tmp_path / "d.npz", layout=layout, channels=channels)
    spec = {"name": "npz", "root": str(tmp_path / "d.npz")}
    train = load_split(spec, "train")
    test = load_split(spec, "test", like=train.info)
    for td, split in ((train, "train"), (test, "test")):
        x = arrays[f"x_{split}"]
        x = x[:, None] if x.ndim == 3 else x if layout == "float" else x.transpose(0, 3, 1, 2)
        expected = torch.from_numpy(np.ascontiguousarray(x)).float() / (1 if layout == "float" else 255)
        torch.testing.assert_close(td.x, expected, rtol=0, atol=1e-7)
        assert td.y.tolist() == arrays[f"y_{split}"].tolist()
    info = train.info
    assert (info.name, info.num_classes, info.in_channels, info.image_size, info.train_size, info.test_size) == ("npz", 3, channels, 8, 24, 8)
    assert info.classes == () and info.stats_from == "training split"
    np.testing.assert_allclose(info.mean, train.x.double().mean(dim=(0, 2, 3)).numpy(), rtol=1e-6)


def test_npz_class_names(tmp_path):
    write_npz(tmp_path / "d.npz", classes=np.array(["ant", "bee", "cow", "doe"]))
    info = load_split({"name": "npz", "root": str(tmp_path / "d.npz")}, "train").info
    assert info.classes == ("ant", "bee", "cow", "doe") and info.num_classes == 4


# ----------------------------------------------------------------------------- bad data: one line, exit 2, no run

def _unreadable(root):
    write_folder(root)
    (root / "train" / "dog" / "001.png").write_bytes(b"\x89PNG but then nothing")


def _mixed_sizes(root):
    write_folder(root)
    write_image(root / "train" / "emu" / "big.png", np.zeros((9, 9, 3), np.uint8))


def _not_square(root):
    write_folder(root, size=8)
    for p in (root / "train").rglob("*.png"):
        write_image(p, np.zeros((8, 6, 3), np.uint8))


def _test_only_class(root):
    write_folder(root, {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "yak": 1}})


def _empty_test(root):
    write_folder(root, {"train": {"cat": 2, "dog": 2}})
    (root / "test" / "cat").mkdir(parents=True)


def _empty_train_class(root):
    write_folder(root, {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1}})
    (root / "train" / "eel").mkdir()


def _loose_files(root):
    write_image(root / "train" / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_image(root / "test" / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))


def _constant(root):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            write_image(root / split / c / "a.png", np.zeros((8, 8), np.uint8))


def _no_test(root):
    write_folder(root, {"train": {"cat": 2, "dog": 2}})


def _link_loop(root):
    write_folder(root)
    os.symlink("x.png", root / "train" / "dog" / "x.png")  # a link to itself: "Too many levels of symbolic links"


def _class_links_to_its_parent(root):
    write_folder(root)
    os.symlink("..", root / "train" / "fake")  # every training image again, as class 'fake'


def _test_links_to_train(root):
    write_folder(root, {"train": {"cat": 2, "dog": 2}})
    os.symlink("train", root / "test")  # the test split would be the training split


def _newline_in_a_name(root):
    write_folder(root)
    (root / "train" / "dog" / "x.png\nflatrobust: error: forged line.png").write_bytes(b"not an image")


FOLDER_CASES = [
    (_link_loop, "train/dog/x.png' cannot be read (Too many levels of symbolic links)"),
    (_class_links_to_its_parent, "train/fake' is a link to"),
    (_test_links_to_train, "test' is a link to"),
    (_newline_in_a_name, "x.png\\nflatrobust: error: forged line.png' is not a readable image"),
    (_unreadable, "train/dog/001.png' is not a readable image"),
    (_mixed_sizes, "big.png' is 9x9 but"),
    (_not_square, "' is 6x8, not square: set data.image_size"),
    (_test_only_class, "test/yak' is a class with no training images"),
    (_empty_test, "test holds no images in class subfolders"),
    (_empty_train_class, "train/eel' holds no images"),
    (_loose_files, "train holds no images directly, not in class subfolders"),
    (_no_test, "has no test/ or val/ subfolder"),
    (_constant, "a channel of the training images is constant (std [0.0]), which cannot be normalized"),
    (lambda root: None, "does not exist: set data.root to a folder"),
]


def _huge_header(path):
    """An .npz whose x_train header declares 10^9 float64 (8 GB) but holds 64 bytes."""
    import io
    import zipfile

    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x_train.npy", buf.getvalue() + b"\0" * 64)


def _npz(**kw):
    return lambda path: write_npz(path, **kw)


NPZ_CASES = [
    (_npz(y_train=np.array([0, 1, -1] * 8)), "y_train holds labels -1..1, outside 0..1"),
    (_npz(classes=np.array(["a", "b"])), "y_train holds labels 0..2, outside 0..1 ('classes' names 2 classes)"),
    (_npz(y_test=np.array([0, 1, 2, 5, 0, 1, 2, 0])), "y_test holds labels 0..5, outside 0..2"),
    (_npz(y_train=np.array([0, 2] * 12)), "class 1 occurs in y_test but never in y_train"),
    (_npz(x_test=np.zeros((0, 8, 8, 3), np.uint8), y_test=np.zeros(0, np.int64)), "x_test holds no images"),
    (_npz(y_test=None, x_test=None), "lacks array(s) x_test, y_test"),
    (_npz(x_train=np.zeros((24, 8, 8, 3), np.int64)), "x_train has dtype int64: store images as uint8"),
    (_npz(y_train=np.zeros(24, np.float32)), "y_train has dtype float32: labels must be integers"),
    (_npz(y_train=np.zeros(23, np.int64)), "y_train has shape (23,): it must hold 24 labels"),
    (_npz(x_train=np.zeros((24, 8, 6, 3), np.uint8)), "holds 8x6 (H x W) images: images must be square"),
    (_npz(x_test=np.full((8, 3, 8, 8), 2.0, np.float32)), "float images must lie in [0, 1]"),
    (_npz(x_test=np.zeros((8, 4, 4, 3), np.uint8)), "test images are (3, 4, 4) (C, H, W), training images (3, 8, 8)"),
    (_npz(classes=np.array(["a", "a", "b"])), "names a class twice"),
    (lambda path: path.write_bytes(b"not a zip"), "is not a readable .npz"),
    (lambda path: np.savez(path, x_train=np.array([{}], dtype=object)), "refused for safety"),
    (lambda path: _huge_header(path), "array 'x_train' declares shape (1000000000,) of float64 (8 GB) but holds 64 bytes: "
                                      "the file is truncated or damaged"),
    (lambda path: None, "does not exist"),
]


def _train_cli(tmp_path, *over):
    return main(["train", "recipes/digits_at.yaml", "epochs=1", "attack.steps=1", "eval.steps=1", "data.eval_subset=4",
                 "batch_size=8", f"out_dir={tmp_path / 'runs'}", "name=x", "--quiet", *over])


def _refused(tmp_path, capsys, kind, root, message):
    """`flatrobust train` on bad data: exit 2, one line naming the file or folder, no run directory."""
    assert _train_cli(tmp_path, f"data.name={kind}", f"data.root={root}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flatrobust: error: ") and message in err and "\n" not in err, err
    assert str(root) in err  # names the file or folder
    assert not (tmp_path / "runs" / "x").exists()


@pytest.mark.parametrize("make, message", FOLDER_CASES, ids=[f.__name__.strip("_") for f, _ in FOLDER_CASES])
def test_bad_folder_exit_2_one_line_naming_the_file(tmp_path, capsys, make, message):
    root = tmp_path / "d"
    make(root)
    _refused(tmp_path, capsys, "imagefolder", root, message)


def test_decompression_bomb_is_one_line(tmp_path, capsys, monkeypatch):
    """An image with more pixels than Pillow's limit (here lowered, as a real bomb takes gigabytes to make)."""
    from PIL import Image

    root = tmp_path / "d"
    write_folder(root)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 8x8 = 64 pixels > 2 x 20: DecompressionBombError
    _refused(tmp_path, capsys, "imagefolder", root, "cat/000.png' is refused: Image size (64 pixels) exceeds limit of 40 pixels")


def test_folder_links_elsewhere_are_followed_and_loops_inside_classes_never(tmp_path):
    """A class folder may link to images outside the tree; a folder link inside a class is not followed
    (as Path.rglob), so a loop there is never entered."""
    write_folder(tmp_path / "elsewhere", {"train": {"emu": 2}})
    expected = write_folder(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    os.symlink(tmp_path / "elsewhere" / "train" / "emu", tmp_path / "d" / "train" / "emu")
    os.symlink(".", tmp_path / "d" / "train" / "cat" / "loop")
    data = imagefolder_module.load_imagefolder(tmp_path / "d", "train")
    assert data.info.classes == ("cat", "dog", "emu") and len(data) == 6
    assert torch.equal(data.x[:4], torch.from_numpy(expected["train"][0]).float() / 255)


@pytest.mark.parametrize("make, message", NPZ_CASES, ids=[m[:30] for _, m in NPZ_CASES])
def test_bad_npz_exit_2_one_line_naming_the_file(tmp_path, capsys, make, message):
    path = tmp_path / "d.npz"
    make(path)
    _refused(tmp_path, capsys, "npz", path, message)


@pytest.mark.parametrize("over, message", [
    (["data.image_size=16"], "data.image_size applies to data.name imagefolder, not to digits"),
    (["data.mean=[0.5]"], "data.mean and data.std go together"),
    (["data.mean=[0.5]", "data.std=[0]"], "data.std must be > 0"),
    (["data.mean=[0.5, 0.5]", "data.std=[0.2, 0.2]"], "need 1 value(s) each"),
    (["data.channels=2"], "data.channels must be one of 0 (as the images are), 1 (greyscale), 3 (RGB)"),
    (["data.name=npz", "data.root=."], "is a folder: data.name npz reads one file"),
])
def test_bad_data_keys_exit_2_one_line(tmp_path, capsys, over, message):
    assert _train_cli(tmp_path, *over) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "runs" / "x").exists()


# ----------------------------------------------------------------------------- whole runs on your own data

TINY = ["epochs=1", "attack.steps=1", "eval.steps=1", "data.eval_subset=6", "batch_size=8", "awp.gamma=0.01", "awp.warmup=0",
        "--quiet"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run trained on a tiny image folder (3 classes, 8x8 RGB), its folder and its cache."""
    base = tmp_path_factory.mktemp("folder_run")
    with pytest.MonkeyPatch.context() as mp:  # module scope: its own cache, undone afterwards
        mp.setenv("FLATROBUST_CACHE", str(base / "cache"))
        write_folder(base / "d", {"train": dict.fromkeys(CLASSES, 8), "test": dict.fromkeys(CLASSES, 4)})
        assert main(["train", "recipes/digits_at.yaml", "data.name=imagefolder", f"data.root={base / 'd'}",
                     f"out_dir={base / 'runs'}", "name=pets", *TINY]) == 0
    return base


def test_run_keeps_the_data_it_was_trained_on(folder_run):
    run = folder_run / "runs" / "pets"
    data = json.loads((run / "data.json").read_text())
    assert data["classes"] == list(CLASSES) and data["root"] == str(folder_run / "d")
    assert (data["in_channels"], data["image_size"], data["train_size"], data["test_size"]) == (3, 8, 24, 12)
    assert data["stats_from"] == "training split" and len(data["mean"]) == 3
    state = torch.load(run / "last.pt", weights_only=True)
    assert DatasetInfo.from_dict(state["data_info"]) == DatasetInfo.from_dict(data)


def test_eval_landscape_flatness_report_on_a_folder_run(folder_run, capsys):
    run = folder_run / "runs" / "pets"
    assert main(["eval", str(run), "--attacks", "clean,pgd20", "--no-checks"]) == 0
    ev = json.loads((run / "eval_best.json").read_text())
    assert ev["n"] == 12 and ev["config"]["data"]["classes"] == list(CLASSES)
    assert main(["landscape", str(run), "--n", "6", "--alphas=-0.5,0,0.5", "--directions", "1", "--steps", "1"]) == 0
    assert main(["flatness", str(run), "--n", "6", "--draws", "1", "--worst-steps", "1", "--steps", "1",
                 "--data", "train"]) == 0
    assert json.loads((run / "flatness_best.json").read_text())["data"]["n"] == 6
    assert main(["report", str(run), "--out", str(folder_run / "report")]) == 0
    md = (folder_run / "report" / "report.md").read_text()
    assert "### Data" in md and "cat, dog, emu" in md and "from the training split" in md


def test_pseudolabel_and_rst_on_a_folder_run(folder_run, tmp_path, capsys):
    images = tmp_path / "unlabeled.npz"
    np.savez(images, x=np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    assert main(["pseudolabel", str(folder_run / "runs" / "pets"), str(images), "--out", str(tmp_path / "extra.npz")]) == 0
    with np.load(tmp_path / "extra.npz", allow_pickle=False) as z:
        assert z["y"].shape == (10,) and z["y"].max() < 3
    assert main(["train", "recipes/digits_at.yaml", "data.name=imagefolder", f"data.root={folder_run / 'd'}",
                 f"data.extra={tmp_path / 'extra.npz'}", f"out_dir={tmp_path}", "name=rst", *TINY]) == 0


def test_eval_moved_folder_with_data_root(folder_run, tmp_path):
    """--data-root points a run at another copy of its folder; classes are matched by name."""
    write_folder(tmp_path / "copy", {"train": {"cat": 1, "dog": 1, "emu": 1}, "test": {"emu": 3}}, seed=9)
    run = folder_run / "runs" / "pets"
    assert main(["eval", str(run), "--attacks", "clean", "--no-checks", "--data-root", str(tmp_path / "copy"),
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 3


def test_npz_run_and_eval(tmp_path, capsys):
    write_npz(tmp_path / "d.npz", layout="grey", channels=1, classes=np.array(["x", "y", "z"]))
    assert main(["train", "recipes/digits_at.yaml", "data.name=npz", f"data.root={tmp_path / 'd.npz'}",
                 f"out_dir={tmp_path}", "name=arr", *TINY]) == 0
    assert json.loads((tmp_path / "arr" / "data.json").read_text())["classes"] == ["x", "y", "z"]
    assert main(["eval", str(tmp_path / "arr"), "--attacks", "clean,pgd20", "--no-checks"]) == 0
    from flatrobust.rundir import eval_files
    assert json.loads(eval_files(tmp_path / "arr")[0].read_text())["n"] == 8


# ----------------------------------------------------------------------------- eval of a plain state_dict


def test_eval_plain_state_dict_matches_the_checkpoint(folder_run, tmp_path):
    run = folder_run / "runs" / "pets"
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save(state["model"], tmp_path / "weights.pt")
    common = ["--attacks", "clean,pgd20", "--no-checks", "--eps", "0.2", "--seed", "3"]
    assert main(["eval", str(run / "last.pt"), *common, "--out", str(tmp_path / "ckpt.json")]) == 0
    assert main(["eval", str(tmp_path / "weights.pt"), "--model", "smallcnn", "--data", f"imagefolder:{folder_run / 'd'}",
                 *common, "--out", str(tmp_path / "sd.json")]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: smallcnn\ndata:\n  name: imagefolder\n  root: {folder_run / 'd'}\n")
    assert main(["eval", str(tmp_path / "weights.pt"), "--model", "smallcnn", "--data", str(recipe),
                 *common, "--out", str(tmp_path / "recipe.json")]) == 0
    a, b, c = (json.loads((tmp_path / f).read_text()) for f in ("ckpt.json", "sd.json", "recipe.json"))
    for name in ("clean", "pgd20"):
        assert a["attacks"][name]["correct"] == b["attacks"][name]["correct"] == c["attacks"][name]["correct"]
    assert a["n"] == b["n"] == c["n"] == 12
    assert b["checkpoint_kind"] == "state_dict" and b["train_config"] is None and b["config"]["model"] == "smallcnn"
    assert "--model smallcnn --data imagefolder:" in b["command"]


def test_eval_plain_state_dict_builtin_data_and_model_args(tmp_path):
    info = DATASETS["digits"]
    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=10, in_channels=1, mean=info.mean, std=info.std, width=4)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert main(["eval", str(tmp_path / "w.pt"), "--model", "preactresnet18", "--model-args", "{width: 4}", "--data", "digits",
                 "--eps", "0.1", "--attacks", "clean", "--no-checks", "--n", "16"]) == 0
    out = json.loads((tmp_path / "eval_w.json").read_text())
    assert out["config"]["model_args"] == {"width": 4} and out["n"] == 16


@pytest.mark.parametrize("args, message", [
    (["--model", "smallcnn", "--eps", "0.1"], "--model needs --data"),
    (["--model", "smallcnn", "--data", "digits"], "pass --eps"),
    (["--data", "digits"], "--data and --model-args go with --model"),
    (["--model", "smallcnn", "--data", "digitz", "--eps", "0.1"], "--data digitz: data.name must be one of"),
    (["--model", "smallcnn", "--data", "imagefolder:", "--eps", "0.1"], "write NAME[:ROOT]"),
    (["--model", "smallcnn", "--data", "missing.yaml", "--eps", "0.1"], "missing.yaml does not exist"),
    (["--model", "smallcnn", "--data", "cifar10", "--eps", "0.1"], "does not fit the model"),
    (["--model", "nosuchnet", "--data", "digits", "--eps", "0.1"], "--model: unknown model"),
    (["--model", "smallcnn", "--model-args", "[1]", "--data", "digits", "--eps", "0.1"], "--model-args must be a YAML mapping"),
    ([], "for a plain state_dict file give --model NAME and --data SPEC"),
    (["--model", "smallcnn", "--data", "digits", "--eps", "0.1", "--weights", "ema"], "--weights ema needs a flatrobust checkpoint"),
])
def test_eval_plain_state_dict_errors_one_line(tmp_path, capsys, args, message):
    torch.manual_seed(0)
    torch.save(models.create("smallcnn", num_classes=10, in_channels=1).state_dict(), tmp_path / "w.pt")
    # (cifar10 needs no file to say what it is: the weights' 1 input channel against its 3 is the mismatch)
    assert main(["eval", str(tmp_path / "w.pt"), "--attacks", "clean", "--no-checks", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "eval_w.json").exists()


# ----------------------------------------------------------------------------- the benchmark and the docs' numbers


def test_imagefolder_read_bench_runs_and_the_docs_quote_its_results(tmp_path, monkeypatch, capsys):
    """bench/imagefolder_read.py runs end to end (so it never rots), on a fresh cache it removes afterwards, and
    the timings in docs/DATA.md and README.md are its committed result, formatted by its own `markdown`."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(imagefolder_module, "DECODE_THREADS", imagefolder_module.DECODE_THREADS)  # restored after
    import imagefolder_read as bench

    write_folder(tmp_path / "d")
    (tmp_path / "caches").mkdir()
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench/imagefolder_read.py", str(tmp_path / "d"), "--repeats", "2", "--thread-check", "6",
                                      "--cache-parent", str(tmp_path / "caches"), "--out", str(out)])
    bench.main()
    res = json.loads(out.read_text())
    assert res["images"] == {"train": 18, "test": 6} and res["shape"] == [3, 8, 8] and res["cache_bytes"] > 18 * 192
    assert len(res["cached_read_s"]["train"]) == 2 and len(res["thread_check"]["wall_s"]["2"]) == 2
    assert list((tmp_path / "caches").iterdir()) == []  # the fresh cache is gone
    assert bench.markdown(res) in capsys.readouterr().out

    committed = json.loads((ROOT / "bench" / "results" / "imagefolder_read_cifar10_jpeg_q75.json").read_text())
    assert committed["images"] == {"train": 50000, "test": 10000}
    assert bench.markdown(committed) in (ROOT / "docs" / "DATA.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for split in ("train", "test"):
        assert f"{committed['first_read_s'][split]:.0f} s" in readme and f"{committed['cached_read_median_s'][split]:.1f} s" in readme
