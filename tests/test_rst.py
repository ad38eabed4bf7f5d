"""Robust self-training (RST): batches mixing labeled and pseudo-labeled extra data, `flatrobust pseudolabel`,
training with `data.extra`, exact resume with extra data, and one-line errors for bad extra files."""
import json

import numpy as np
import pytest
import torch

from flatrobust.cli import main
from flatrobust.config import load_config
from flatrobust.data import load_dataset, mixed_batch_sizes, mixed_batches
from flatrobust.train import fit

TINY = ["awp.warmup=0", "data.train_subset=128", "data.eval_subset=32", "batch_size=32", "attack.steps=2", "eval.steps=2",
        "optim.lr=0.05"]


def test_mixed_batches_cover_labeled_once_and_fill_with_extra():
    g = torch.Generator().manual_seed(0)
    out = mixed_batches(10, 7, 4, 0.5, generator=g)
    assert mixed_batch_sizes(4, 0.5) == (2, 2) and len(out) == 5
    lab = torch.cat([b[b < 10] for b in out])
    ext = torch.cat([b[b >= 10] for b in out])
    assert sorted(lab.tolist()) == list(range(10))  # every labeled example once per epoch
    assert all((b < 10).sum() == 2 and (b >= 10).sum() == 2 for b in out)
    assert len(set(ext[:7].tolist())) == 7 and ext.max() < 17  # without replacement until the extra data runs out
    again = mixed_batches(10, 7, 4, 0.5, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    # a short last labeled batch gets extra examples in proportion; fraction 0 is plain batches
    short = mixed_batches(5, 7, 4, 0.5, generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in short] == [4, 4, 2]
    assert mixed_batch_sizes(8, 0.25) == (6, 2) and mixed_batch_sizes(2, 0.9) == (1, 1)


def _digits_npz(path, n=200, seed=3):
    """Unlabeled digits images as uint8 (N, 8, 8), the layout of an image dump."""
    train = load_dataset("digits", "train").subset(n, seed=seed)
    np.savez(path, x=(train.x[:, 0] * 255).round().to(torch.uint8).numpy())
    return train


def test_pseudolabel_then_rst_training(tmp_path, capsys):
    assert main(["train", "recipes/digits_at.yaml", *TINY, "epochs=2", f"out_dir={tmp_path}", "name=teacher", "--quiet"]) == 0
    images = tmp_path / "unlabeled.npz"
    _digits_npz(images)
    extra = tmp_path / "extra.npz"
    assert main(["pseudolabel", str(tmp_path / "teacher"), str(images), "--out", str(extra)]) == 0
    assert "data.extra=" in capsys.readouterr().out
    with np.load(extra, allow_pickle=False) as z:
        assert z["x"].shape == (200, 8, 8) and z["x"].dtype == np.uint8
        assert z["y"].shape == (200,) and z["y"].min() >= 0 and z["y"].max() <= 9
        assert ((z["confidence"] > 0) & (z["confidence"] <= 1)).all()

    assert main(["train", "recipes/digits_at_awp.yaml", *TINY, "epochs=2", f"data.extra={extra}", "data.extra_fraction=0.5",
                 f"out_dir={tmp_path}", "name=rst", "--quiet"]) == 0
    rows = [json.loads(ln) for ln in (tmp_path / "rst" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 * (128 // 16)  # one epoch = one pass over the labeled data, 16 labeled per batch


def test_rst_resume_equals_uninterrupted(tmp_path):
    extra = tmp_path / "extra.npz"
    train = load_dataset("digits", "train").subset(100, seed=5)
    np.savez(extra, x=train.x.numpy(), y=train.y.numpy())  # float images in [0, 1], channels first
    over = [*TINY, "epochs=2", "checkpoint_every=1", f"data.extra={extra}", f"out_dir={tmp_path}"]
    full = fit(load_config("recipes/digits_at_awp.yaml", over + ["name=full"]), progress=False)
    cfg = load_config("recipes/digits_at_awp.yaml", over + ["name=cut"])
    cut = fit(cfg, progress=False, stop_after_steps=11)  # inside epoch 2 (8 steps per epoch)
    fit(cfg, resume_dir=cut, progress=False)
    a, b = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("make, message", [
    (None, "does not exist"),
    (lambda p: np.savez(p, x=np.zeros((4, 3, 32, 32), np.uint8), y=np.zeros(4, np.int64)), "(C, H, W)"),
    (lambda p: np.savez(p, x=np.zeros((4, 8, 8), np.uint8), y=np.full(4, 10)), "must lie in 0..9"),
    (lambda p: np.savez(p, x=np.zeros((4, 8, 8), np.uint8)), "must hold arrays 'x'"),
    (lambda p: np.savez(p, x=np.zeros((4, 8, 8), np.uint8), y=np.array([{}, {}, {}, {}], dtype=object)), "refused for safety"),
    (lambda p: p.write_bytes(b"not a zip"), "not a readable .npz"),
])
def test_bad_extra_file_exit_2_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "extra.npz"
    if make is not None:
        make(path)
    rc = main(["train", "recipes/digits_at.yaml", *TINY, f"data.extra={path}", f"out_dir={tmp_path}", "name=x", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "x").exists()


def test_pseudolabel_bad_images_exit_2_one_line(tmp_path, capsys):
    assert main(["train", "recipes/digits_at.yaml", *TINY, "epochs=1", f"out_dir={tmp_path}", "name=t", "--quiet"]) == 0
    np.savez(tmp_path / "rgb.npz", x=np.zeros((2, 5, 5, 7), np.uint8))
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 8, 8), np.uint8), b=np.zeros(2))
    for images, message in [("missing.npz", "does not exist"), ("rgb.npz", "(C, H, W)"), ("two.npz", "name the images array x")]:
        rc = main(["pseudolabel", str(tmp_path / "t"), str(tmp_path / images), "--out", str(tmp_path / "o.npz")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and "\n" not in err, (images, err)
        assert not (tmp_path / "o.npz").exists()
