"""No host synchronization inside a training step: every way Python can read a tensor's value on the host
is counted while steps run (on the CPU, where the code path is the one a GPU runs), and the count between
two reads of the metrics must be zero, for AT, TRADES and MART, each without and with AWP (and Free AT).

Checked to fail when a sync is put back: `float(loss)` in `train_step`, or `bool(ok.all())` in
`AWP.perturb`, makes `test_no_host_sync_between_reads` fail with the line that does it.
"""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch

from flatrobust import AWP, create_objective, models
from flatrobust.config import load_config
from flatrobust.guard import Rollback, StepMonitor
from flatrobust.objectives import AttackConfig
from flatrobust.train import fit, train_step

# Tensor methods that make the host wait for the device's value (or copy it to the host).
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
                "__array__", "__repr__", "__format__", "nonzero", "unique", "masked_select", "equal", "is_nonzero")
SYNC_FUNCTIONS = ("nonzero", "unique", "masked_select", "equal", "allclose", "is_nonzero", "argwhere")


class SyncCounter:
    """Wraps every host-reading entry point; `calls` records (what, innermost flatrobust frame)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.active = False

    def _record(self, what: str) -> None:
        if not self.active:
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "flatrobust" in f.filename or "test_" in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
        self.calls.append((what, where))

    def _wrap(self, owner, name: str, what: str, only=None):
        orig = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if only is None or only(args, kwargs):
                self._record(what)
            return orig(*args, **kwargs)

        return orig, wrapper

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        def to_host(args, kwargs):  # .to("cpu") / .to(torch.device("cpu"))
            targets = list(args[1:]) + list(kwargs.values())
            return any(str(t) == "cpu" for t in targets if isinstance(t, (str, torch.device)))

        def bool_index(args, kwargs):  # x[mask] needs the number of True entries on the host
            idx = args[1] if len(args) > 1 else None
            idx = idx if isinstance(idx, tuple) else (idx,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)

        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(torch.Tensor, name, f"Tensor.{name}")[1])
        for name in SYNC_FUNCTIONS:
            monkeypatch.setattr(torch, name, self._wrap(torch, name, f"torch.{name}")[1])
        monkeypatch.setattr(torch.Tensor, "to", self._wrap(torch.Tensor, "to", "Tensor.to(cpu)", to_host)[1])
        monkeypatch.setattr(torch.Tensor, "__getitem__", self._wrap(torch.Tensor, "__getitem__", "Tensor[bool mask]", bool_index)[1])
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")[1])
        yield self


def _steps(method: str, awp_on: bool, monkeypatch, *, steps: int = 3, skip: bool = False, kind: str = "pgd"):
    torch.manual_seed(0)
    model = models.create("smallcnn", num_classes=10, in_channels=1)
    objective = create_objective(method, AttackConfig(eps=0.1, alpha=0.05, steps=2, kind=kind))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    awp = AWP(model, gamma=0.01) if awp_on else None
    rollback = Rollback(model, opt) if skip else None
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    monitor = StepMonitor(x.device)
    monitor.start(0)
    counter = SyncCounter()
    with counter.installed(monkeypatch):
        counter.active = True
        for _ in range(steps):
            r = train_step(model, objective, opt, x, y, awp=awp, generator=g, rollback=rollback)
            monitor.add(r.loss, r.correct, len(y), r.finite, awp)
        between = list(counter.calls)
        report = monitor.read()
        at_read = counter.calls[len(between):]
        counter.active = False
    return between, at_read, report


@pytest.mark.parametrize("method", ["at", "trades", "mart"])
@pytest.mark.parametrize("awp_on", [False, True], ids=["plain", "awp"])
def test_no_host_sync_between_reads(method, awp_on, monkeypatch):
    between, at_read, report = _steps(method, awp_on, monkeypatch)
    assert between == [], f"host syncs inside the training steps: {between}"
    assert len(at_read) == 1, at_read  # the read is one transfer of everything
    assert report.seen == 3 * 16 and report.bad == 0


def test_no_host_sync_with_rollback(monkeypatch):
    """nonfinite=skip masks the update on the device: still no sync."""
    between, _, report = _steps("trades", True, monkeypatch, skip=True)
    assert between == [], between
    assert report.bad == 0


@pytest.mark.parametrize("method", ["at", "trades"])
def test_no_host_sync_in_free_at_replays(method, monkeypatch):
    """Free AT (its carried perturbation moved by the step's own input gradient), with AWP and nonfinite=skip: no sync."""
    between, _, report = _steps(method, True, monkeypatch, skip=True, kind="free")
    assert between == [], between
    assert report.seen == 3 * 16 and report.bad == 0


def test_counter_sees_each_kind_of_sync(monkeypatch):
    """The counter itself works: each way of reading a value is recorded."""
    t = torch.ones(3)
    counter = SyncCounter()
    with counter.installed(monkeypatch):
        counter.active = True
        t.sum().item(), bool(t.all()), float(t[0]), int(t[1]), t.tolist(), t.cpu(), t.numpy(), t.to("cpu")
        t[t > 0], t.nonzero(), torch.nonzero(t), torch.equal(t, t), f"{t.sum()}"
        counter.active = False
    kinds = {c[0] for c in counter.calls}
    assert {"Tensor.item", "Tensor.__bool__", "Tensor.__float__", "Tensor.__int__", "Tensor.tolist", "Tensor.cpu",
            "Tensor.numpy", "Tensor.to(cpu)", "Tensor[bool mask]", "Tensor.nonzero", "torch.nonzero", "torch.equal",
            "Tensor.__format__"} <= kinds


def test_fit_syncs_only_at_reads_checkpoints_and_evaluation(tmp_path, monkeypatch):
    """A whole `fit`: every host sync comes from the metric read, the checkpoint or the per-epoch evaluation,
    and the reads happen every log.interval steps (plus one at each epoch end)."""
    counter = SyncCounter()
    over = ["awp.warmup=0", "data.train_subset=256", "data.eval_subset=16", "batch_size=32", "attack.steps=1",
            "eval.steps=1", "epochs=2", "log.interval=3", f"out_dir={tmp_path}", "deterministic=false",
            "ema.decay=0.9"]  # the EMA's update after every step adds no sync either
    cfg = load_config("recipes/digits_at_awp.yaml", over)
    start = StepMonitor.start

    def start_counting(self, step):  # from the first step on: setup (data loading, model building) aside
        counter.active = True
        start(self, step)

    monkeypatch.setattr(StepMonitor, "start", start_counting)
    with counter.installed(monkeypatch):
        fit(cfg, progress=False)
        counter.active = False
    # metric reads, checkpoints, evaluation (accuracies; the top predicted-class share of the collapse check)
    allowed = ("guard.py:", "_check_weights_finite", "_accuracy", "top_class_share")
    bad = [c for c in counter.calls if not any(a in c[1] for a in allowed)]
    assert bad == [], bad
    reads = [c for c in counter.calls if "guard.py" in c[1]]
    assert len(reads) == 2 * (8 // 3 + 1)  # 8 steps per epoch: reads after steps 3 and 6, and at the epoch end


def test_data_on_device_rule(monkeypatch):
    """data.on_device: on a CPU always in place; auto keeps data on the GPU when it fits in half its free memory."""
    from flatrobust.train import keep_on_device

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert keep_on_device(10**12, cpu, "off")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert keep_on_device(500, cuda, "auto") and not keep_on_device(501, cuda, "auto")
    assert keep_on_device(10**9, cuda, "on") and not keep_on_device(1, cuda, "off")


def test_host_data_batches_equal_device_batches():
    """Data kept in host memory: each batch is gathered on the host and copied to the device (here: to the
    meta device, the only other device a CPU-only machine has) with the same shapes as the on-device path;
    on the CPU both paths index the same tensor."""
    from flatrobust.data import DATASETS, TensorData
    from flatrobust.train import _fetch

    data = TensorData(torch.rand(20, 1, 8, 8), torch.arange(20), DATASETS["digits"])
    idx = torch.tensor([3, 1, 4, 1, 5])
    x, y = _fetch(data, idx, torch.device("cpu"))
    assert torch.equal(x, data.x[idx]) and torch.equal(y, data.y[idx])
    xm, ym = _fetch(data, idx, torch.device("meta"))
    assert xm.device.type == "meta" and xm.shape == x.shape and ym.shape == y.shape and ym.dtype == y.dtype
