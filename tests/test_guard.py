"""Training guard: a non-finite loss or AWP gradient stops the run (naming epoch, step, layer) and keeps
the last good checkpoint, or, with nonfinite=skip, skips the batch and counts it."""
import json

import pytest
import torch

from flatrobust import objectives
from flatrobust.config import load_config
from flatrobust.train import NonFiniteError, fit

TINY = ["awp.warmup=0", "data.train_subset=128", "data.eval_subset=32", "batch_size=64", "attack.steps=1", "eval.steps=1",
        "attack.eps=0.2", "attack.alpha=0.2", "awp.gamma=0.01", "epochs=3"]


def _poison(monkeypatch, bad_calls: set[int]):
    """Make the AT training loss non-finite on the given (1-based) calls, i.e. training steps."""
    orig = objectives.AT.loss_and_logits
    calls = {"n": 0}

    def poisoned(self, model, x, x_adv, y):
        calls["n"] += 1
        loss, logits = orig(self, model, x, x_adv, y)
        return (loss * float("nan") if calls["n"] in bad_calls else loss), logits

    monkeypatch.setattr(objectives.AT, "loss_and_logits", poisoned)


def _stops_keeping_epoch_1(tmp_path, pattern):
    """A tiny run (awp.gamma=0: with AWP on, the ascent calls the poisoned functions too and calls no longer
    count steps) stops with `pattern` in epoch 2, its last.pt still epoch 1's, every weight finite."""
    cfg = load_config("recipes/digits_at_awp.yaml", TINY + [f"out_dir={tmp_path}", "awp.gamma=0"])
    with pytest.raises(NonFiniteError, match=pattern):
        fit(cfg, progress=False)
    ckpt = torch.load(tmp_path / "digits_at_awp" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, {4})  # 2 steps per epoch: call 4 is epoch 2, step 2
    _stops_keeping_epoch_1(tmp_path, r"epoch 2, step 2 .*training loss is nan\); last good checkpoint kept: \S+last\.pt: "
                                     r"lower optim\.lr, or set nonfinite=skip$")


def test_nonfinite_awp_gradient_names_the_layer(tmp_path, monkeypatch):
    orig = objectives.AT.ascent_loss

    def bad_ascent(self, model, x, x_adv, y):
        return orig(self, model, x, x_adv, y) * float("inf")

    monkeypatch.setattr(objectives.AT, "ascent_loss", bad_ascent)
    cfg = load_config("recipes/digits_at_awp.yaml", TINY + [f"out_dir={tmp_path}"])
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 1 .*AWP ascent gradient is not finite in layer '[\w.]+weight'"):
        fit(cfg, progress=False)


def test_skip_mode_counts_skipped_batches(tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3})
    cfg = load_config("recipes/digits_at_awp.yaml", TINY + [f"out_dir={tmp_path}", "nonfinite=skip", "awp.gamma=0"])
    run = fit(cfg, progress=False)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_batches"] for r in rows] == [1, 1, 0]
    assert torch.load(run / "last.pt", weights_only=True)["skipped"] == 2


def _count_steps(monkeypatch) -> dict:
    """Count training steps (calls of train_step) as the loop makes them."""
    from flatrobust import train as train_module

    orig, calls = train_module.train_step, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return orig(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", counted)
    return calls


def test_nonfinite_step_is_detected_at_the_next_read(tmp_path, monkeypatch):
    """The flag stays on the device until the next read: the run stops at the first read after the bad step
    (log.interval=3: after step 3), naming the bad step itself."""
    _poison(monkeypatch, {2})
    steps = _count_steps(monkeypatch)
    over = ["data.train_subset=256", "batch_size=32", "log.interval=3", "awp.gamma=0", f"out_dir={tmp_path}"]
    cfg = load_config("recipes/digits_at_awp.yaml", TINY + over)  # 8 steps per epoch
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 2 .*training loss is nan"):
        fit(cfg, progress=False)
    assert steps["n"] == 3


def test_nonfinite_step_is_caught_before_a_mid_epoch_checkpoint(tmp_path, monkeypatch):
    """checkpoint_every forces a read first: no checkpoint is written after a non-finite step."""
    _poison(monkeypatch, {2})
    over = ["data.train_subset=256", "batch_size=32", "log.interval=50", "checkpoint_every=2", "awp.gamma=0", f"out_dir={tmp_path}"]
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 2 .*; no checkpoint was written yet \(\S+ holds none\)"):
        fit(load_config("recipes/digits_at_awp.yaml", TINY + over), progress=False)
    assert not (tmp_path / "digits_at_awp" / "last.pt").exists()


def test_nonfinite_weights_after_a_finite_loss_are_never_checkpointed(tmp_path, monkeypatch):
    """A step whose loss was finite but whose update made the weights non-finite: the checkpoint refuses them."""
    orig, calls = torch.optim.SGD.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # the last step of epoch 2
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    _stops_keeping_epoch_1(tmp_path, r"weights are non-finite after epoch 2")


@pytest.mark.parametrize("awp_on", [False, True], ids=["plain", "awp"])
def test_rollback_undoes_a_nonfinite_step_exactly(awp_on):
    """nonfinite=skip without a host sync: after a non-finite step, weights, BN statistics and optimizer
    state are bit-identical to before it; a finite step is kept; state created by an undone first step is zero."""
    from flatrobust import AWP, create_objective, models
    from flatrobust.guard import Rollback
    from flatrobust.objectives import AttackConfig
    from flatrobust.train import train_step

    torch.manual_seed(0)
    model = models.create("smallcnn", num_classes=10, in_channels=1)
    objective = create_objective("at", AttackConfig(eps=0.1, alpha=0.05, steps=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    awp = AWP(model, gamma=0.01) if awp_on else None
    rollback = Rollback(model, opt)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    bad_x = x.clone()
    bad_x[0, 0, 0, 0] = float("nan")  # poisons the logits, the loss and (with AWP) the ascent gradient

    def snapshot():
        return ({k: v.clone() for k, v in model.state_dict().items()},
                {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()})

    def same(a, b):
        return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and \
            a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])

    objective.attack = lambda m, xx, yy, generator=None: xx  # the NaN must reach the loss unchanged
    r = train_step(model, objective, opt, bad_x, y, awp=awp, rollback=rollback)  # first step: no momentum yet
    assert not bool(r.finite)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all((v["momentum_buffer"] == 0).all() for v in opt.state_dict()["state"].values())
    train_step(model, objective, opt, x, y, awp=awp, rollback=rollback)
    before = snapshot()
    r = train_step(model, objective, opt, bad_x, y, awp=awp, rollback=rollback)
    assert not bool(r.finite) and same(before, snapshot())
    r = train_step(model, objective, opt, x, y, awp=awp, rollback=rollback)
    assert bool(r.finite) and not same(before, snapshot())


def test_skip_gives_up_when_every_step_of_an_epoch_is_skipped(tmp_path, monkeypatch):
    """nonfinite=skip with nothing left but skipping (a diverged run) is a failure, not `loss 0.0000` and exit 0."""
    _poison(monkeypatch, {3, 4})  # 2 steps per epoch: all of epoch 2
    cfg = load_config("recipes/digits_at_awp.yaml", TINY + [f"out_dir={tmp_path}", "nonfinite=skip", "awp.gamma=0"])
    with pytest.raises(NonFiniteError, match=r"^nonfinite=skip skipped all 2 steps of epoch 2: training makes no progress "
                                             r"\(.*training loss is nan\); last checkpoint kept: \S+last\.pt: lower optim\.lr"):
        fit(cfg, progress=False)
    assert len((tmp_path / "digits_at_awp" / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 2 not recorded


def test_skip_gives_up_after_too_many_steps_in_a_row(tmp_path, monkeypatch):
    from pathlib import Path

    from flatrobust import guard

    docs = (Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md").read_text()
    assert f"`guard.MAX_SKIPPED_RUN` ({guard.MAX_SKIPPED_RUN}) steps in a row" in docs  # the documented limit is the code's
    monkeypatch.setattr(guard, "MAX_SKIPPED_RUN", 3)
    _poison(monkeypatch, {3, 4, 5})  # 8 steps per epoch: steps 3-5 of epoch 1, three in a row
    over = ["data.train_subset=256", "batch_size=32", "nonfinite=skip", "awp.gamma=0", f"out_dir={tmp_path}"]
    with pytest.raises(NonFiniteError, match=r"^nonfinite=skip skipped 3 steps in a row in epoch 1: .*step 3, training loss "
                                             r"is nan\); no checkpoint was written yet"):
        fit(load_config("recipes/digits_at_awp.yaml", TINY + over), progress=False)
    _poison(monkeypatch, {3, 4, 6, 7})  # never three in a row, never a whole epoch: the run trains on
    fit(load_config("recipes/digits_at_awp.yaml", TINY + over + ["name=ok"]), progress=False)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_an_overflowing_awp_gamma_is_blamed_not_the_learning_rate(tmp_path, mode, capsys):
    """awp.gamma=1e308: what goes non-finite is AWP's perturbation, so the message blames awp.gamma (exit 3)."""
    from flatrobust.cli import main

    rc = main(["train", "recipes/digits_at_awp.yaml", *TINY, "awp.gamma=1e308", f"nonfinite={mode}", f"out_dir={tmp_path}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and err.count("\n") == 1, err
    assert "AWP perturbation is not finite in layer 'net.conv1.weight': gamma * ||w|| overflows" in err, err
    assert err.rstrip().endswith("no checkpoint was written yet (" + str(tmp_path / "digits_at_awp") + " holds none): lower awp.gamma")
    assert "optim.lr" not in err
    assert ("nonfinite=skip skipped all 2 steps of epoch 1" if mode == "skip" else "non-finite value at epoch 1, step 1") in err


def test_each_cause_is_told_and_blamed_apart():
    """StepMonitor tells from AWP's device flags what went non-finite first; the blame follows from it."""
    from types import SimpleNamespace

    from flatrobust.guard import StepMonitor

    t, f = torch.tensor(True), torch.tensor(False)
    cases = [  # (AWP flags or None, cause as described, blamed)
        (None, "training loss is nan", "optim.lr"),
        (dict(layer_finite=torch.tensor([True, False]), perturbation_finite=torch.tensor([True, True]), loss_finite=t),
         "AWP ascent gradient is not finite in layer 'b'", "optim.lr (or awp.gamma"),
        (dict(layer_finite=torch.tensor([True, True]), perturbation_finite=torch.tensor([True, False]), loss_finite=t),
         "AWP perturbation is not finite in layer 'b'", "awp.gamma"),
        (dict(layer_finite=torch.tensor([True, True]), perturbation_finite=torch.tensor([True, True]), loss_finite=t),
         "at the AWP-perturbed weights w + v, finite at w", "awp.gamma"),
        (dict(layer_finite=torch.tensor([True, True]), perturbation_finite=torch.tensor([True, True]), loss_finite=f),
         "not finite at the unperturbed weights w either", "optim.lr (or awp.gamma"),
    ]
    for awp, said, blamed in cases:
        monitor = StepMonitor(torch.device("cpu"))
        monitor.start(0)
        monitor.add(torch.tensor(1.0), torch.tensor(3), 8, t, None)
        monitor.add(torch.tensor(float("nan")), torch.tensor(0), 8, f, SimpleNamespace(**awp) if awp else None)
        r = monitor.read()
        assert r.bad == 1 and r.first_bad == 1 and r.longest_bad_run == 1
        assert said in r.describe(["a", "b"]) and r.blame.startswith(blamed), (said, r.describe(["a", "b"]), r.blame)
