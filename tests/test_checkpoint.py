"""Checkpoints: atomic writes, safe loading, one-line errors."""
import errno
import os
import pickle
import stat

import pytest
import torch

from flatrobust import models
from flatrobust.checkpoint import CheckpointError, WriteError, load_checkpoint, model_from_checkpoint, save_checkpoint

CFG = {"model": "smallcnn", "data": {"name": "digits"}}


def _state(seed=0):
    torch.manual_seed(seed)
    return {"config": CFG, "model": models.create("smallcnn", in_channels=1, mean=(0.3,), std=(0.4,)).state_dict()}


def test_roundtrip_with_weights_only(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(_state(), path)
    raw = torch.load(path, weights_only=True)  # loadable by plain torch, safely
    assert raw["format"] == "flatrobust"
    model, ckpt = model_from_checkpoint(path)
    assert not model.training
    for k, v in _state()["model"].items():
        assert torch.equal(model.state_dict()[k], v)


def test_crash_during_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(0), path)
    good = path.read_bytes()

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(WriteError, match=r"^cannot write '\S+last.pt': disk full; the previous file is kept$"):
        save_checkpoint(_state(1), path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written, as on a full disk."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, b):
        if len(b) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk(monkeypatch, room: int = 1000):
    """Every file written atomically from now on (checkpoints, JSON) meets a full disk after `room` bytes."""
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(fdopen(fd, *a, **k), room))


@pytest.mark.parametrize("room", [10, 100_000], ids=["in_the_header", "in_the_tensors"])
def test_disk_full_during_a_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, room):
    """torch.save on a full disk raises OSError, or (inside its zip writer) RuntimeError 'unexpected pos'
    with the OSError as its context: both are one WriteError line."""
    path = tmp_path / "last.pt"
    save_checkpoint(_state(0), path)
    good = path.read_bytes()
    fill_disk(monkeypatch, room)
    with pytest.raises(WriteError, match=r"^cannot write '\S+last.pt': No space left on device \(the disk is full\); "
                                         r"the previous file is kept$"):
        save_checkpoint(_state(1), path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(WriteError, match="nothing was written$"):
        save_checkpoint(_state(1), tmp_path / "new.pt")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """best.pt, last.pt, eval.json (every atomic write) are created 0666 less the umask, like any file the user
    writes, not mkstemp's 0600."""
    from flatrobust.atomic import write_json  # the one JSON writer (eval.json, landscape.json, ...)

    old = os.umask(umask)
    try:
        save_checkpoint(_state(), tmp_path / "last.pt")
        write_json(tmp_path / "eval.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("last.pt", "eval.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("damage", ["truncate", "flipped", "empty"])
def test_corrupted_file_gives_one_line(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(_state(), path)
    data = path.read_bytes()
    flipped = data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:]  # torch.save's header, damaged inside
    path.write_bytes({"truncate": data[: len(data) // 2], "flipped": flipped, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content, what", [
    (b"hello world\nthis is a text file renamed .pt\n", "it is a text file (first line 'hello world')"),
    (b"model:\n  lr: 0.1\n", "it is a text file (first line 'model:')"),
    (b"\x00not a checkpoint at all" * 80, "its first bytes are b'\\x00not a c'"),
])
def test_a_file_that_is_not_a_torch_file_is_not_a_checkpoint(tmp_path, content, what):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == (f"{path} is not a checkpoint: {what}, not a file written by torch.save; pass a .pt file "
                            "written by `flatrobust train` (or its run directory)")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the hand-made pickle: expected here
def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "flatrobust", "version": 1, "config": CFG, "model": {}, "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused for safety") as e:
        load_checkpoint(path)
    assert not marker.exists()
    assert "\n" not in str(e.value)
    # the same payload as a raw pickle file is refused too
    raw = tmp_path / "evil2.pt"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_not_ours_and_missing(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a flatrobust checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="without best.pt or last.pt"):
        load_checkpoint(tmp_path)


def test_run_directory_resolves_to_best(tmp_path):
    save_checkpoint({**_state(0), "tag": "last"}, tmp_path / "last.pt")
    save_checkpoint({**_state(0), "tag": "best"}, tmp_path / "best.pt")
    assert load_checkpoint(tmp_path)["tag"] == "best"
