"""Shared fixtures: scikit-learn's digits as tensors, and a small CNN trained on them for a few seconds."""
from __future__ import annotations

import os

# Subprocesses the tests start (the CLI, torchrun) inherit this: on a loaded machine OpenMP threads that
# spin-wait for each other make a multi-threaded process many times slower than a single-threaded one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F

# One intra-op thread: the tests run tiny models, for which a second thread costs more in
# synchronization than it brings (and on a busy 2-core machine it makes them many times slower).
torch.set_num_threads(1)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


@pytest.fixture(scope="session")
def digits():
    x, y = _digits()
    return x[:1400], y[:1400], x[1400:], y[1400:]  # train, test


@pytest.fixture(scope="session")
def trained_cnn(digits):
    """SmallCNN trained naturally on digits (about 95% clean test accuracy), in eval mode."""
    from flatrobust import models

    torch.manual_seed(0)
    xtr, ytr, _, _ = digits
    model = models.create("smallcnn", num_classes=10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(8):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def write_digits_checkpoint(path, model, eps: float):
    """A checkpoint as `flatrobust train` writes it for `model` (a digits SmallCNN) trained at L-inf `eps`."""
    from flatrobust.checkpoint import save_checkpoint

    cfg = {"model": "smallcnn", "seed": 0, "data": {"name": "digits", "root": None, "download": False},
           "attack": {"norm": "linf", "eps": eps, "alpha": eps / 4, "steps": 10}}
    save_checkpoint({"config": cfg, "model": model.state_dict(), "epoch": 7}, path)
    return path


def write_untrained_checkpoint(tmp_path):
    """tmp_path/run/best.pt: an untrained digits SmallCNN (seed 0) with a short PGD in its config, for CLI tests."""
    from flatrobust import models
    from flatrobust.checkpoint import save_checkpoint
    from flatrobust.data import DATASETS

    info = DATASETS["digits"]
    torch.manual_seed(0)
    model = models.create("smallcnn", info.num_classes, info.in_channels, info.mean, info.std)
    cfg = {"name": "tiny", "model": "smallcnn", "seed": 0,
           "data": {"name": "digits", "root": str(tmp_path / "data"), "download": False},
           "attack": {"norm": "linf", "eps": 0.1, "alpha": 0.025, "steps": 2}}
    path = tmp_path / "run" / "best.pt"
    save_checkpoint({"config": cfg, "model": model.state_dict()}, path)
    return path


def write_best_and_last(tmp_path):
    """tmp_path/run/{best,last}.pt: two untrained digits SmallCNNs (seeds 0 and 1, epochs 1 and 3) of one run, as
    `write_untrained_checkpoint` writes best.pt; their analyses differ, so a file of one is told from the other's."""
    from flatrobust.checkpoint import save_checkpoint

    best = write_untrained_checkpoint(tmp_path)
    state = torch.load(best, weights_only=True)
    save_checkpoint({**state, "epoch": 1}, best)
    torch.manual_seed(1)
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint({**state, "model": other, "epoch": 3}, best.parent / "last.pt")
    return best, best.parent / "last.pt"


def collapse_robust_accuracy(monkeypatch, call: int = 3) -> None:
    """flatrobust.train.robust_accuracy with the robust accuracy of its `call`-th measurement set to 0 (test then train
    per epoch or pass, so 3 = the second epoch's test PGD accuracy): a catastrophic collapse the guard can see."""
    from flatrobust import train

    calls, measure = [], train.robust_accuracy

    def collapsing(*args, **kwargs):
        calls.append(1)
        clean, robust = measure(*args, **kwargs)
        return (clean, 0.0) if len(calls) == call else (clean, robust)
    monkeypatch.setattr(train, "robust_accuracy", collapsing)
