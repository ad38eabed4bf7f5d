"""Issue 32: the official training script's options: training attacks (FGSM, none, PGD restarts), the validation
split, cutout, L1/L2, the catastrophic overfitting guard, and their one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import collapse_robust_accuracy
import torch
from torch import nn

from flatrobust import catastrophic
from flatrobust.attacks import AttackConfig, fgsm_train
from flatrobust.cli import main
from flatrobust.config import load_config
from flatrobust.data import TensorData
from flatrobust.errors import UserError
from flatrobust.objectives import create_objective
from flatrobust.train import fit, hold_out

TINY = ["data.train_subset=128", "data.eval_subset=32", "batch_size=64", "attack.eps=0.2", "eval.steps=2", "optim.lr=0.05",
        "epochs=2"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


def test_fgsm_takes_one_step_of_alpha_from_its_start_within_the_ball():
    model, x, y = _linear(), torch.rand(5, 3, 2, 2) * 0.5 + 0.25, torch.tensor([0, 1, 2, 0, 1])
    zero = fgsm_train(model, x, y, eps=0.1, alpha=0.125, start="zero")
    assert torch.allclose((zero - x).abs(), torch.full_like(x, 0.1))  # a step of 1.25 eps, clipped to the ball
    g = torch.Generator().manual_seed(0)
    rand = fgsm_train(model, x, y, eps=0.1, alpha=0.125, start="random", generator=g)
    assert (rand - x).abs().max() <= 0.1 + 1e-7 and not torch.equal(rand, zero)
    prev = fgsm_train(model, x, y, eps=0.1, alpha=0.01, start=torch.full_like(x, 0.05))
    assert torch.allclose((prev - x).abs(), torch.full_like(x, 0.05), atol=0.0101) and not torch.allclose(prev - x, torch.full_like(x, 0.05))


def test_attack_kinds_of_the_objectives():
    model, x, y = _linear(), torch.rand(4, 3, 2, 2) * 0.5 + 0.25, torch.tensor([0, 1, 2, 0])
    cfg = AttackConfig(eps=0.1, kind="fgsm")
    assert cfg.alpha == pytest.approx(0.125) and cfg.evaluation.alpha == pytest.approx(0.025)
    assert cfg.as_dict()["kind"] == "fgsm" and "kind" not in AttackConfig(eps=0.1).as_dict()  # old configs unchanged
    none = create_objective("at", AttackConfig(eps=0.1, kind="none"))
    assert torch.equal(none.attack(model, x, y), x)  # standard training: AWP ascends the clean loss
    prev = create_objective("at", AttackConfig(eps=0.1, alpha=0.02, kind="fgsm", init="previous"))
    first = prev.attack(model, x, y)
    assert torch.allclose((first - x).abs(), torch.full_like(x, 0.02))  # from zero
    second = prev.attack(model, x[:3], y[:3])  # a shorter batch starts from the head of the previous perturbation
    assert torch.allclose((second - x[:3]).abs().max(), torch.tensor(0.04)) and prev.state_dict()["previous"].shape[0] == 3
    again = create_objective("at", AttackConfig(eps=0.1, alpha=0.02, kind="fgsm", init="previous"))
    again.load_state_dict(prev.state_dict())
    assert torch.equal(again.attack(model, x[:3], y[:3]), prev.attack(model, x[:3], y[:3]))


def test_fgsm_and_standard_training_run_with_awp_and_record_their_attack(tmp_path):
    for kind, method in [("fgsm", "at"), ("fgsm", "trades"), ("none", "at")]:
        cfg = load_config("recipes/digits_at_awp.yaml", [*TINY, "epochs=1", f"attack.kind={kind}", f"method={method}", "awp.warmup=0",
                                                         "attack.alpha=null", f"out_dir={tmp_path}", f"name={kind}_{method}"])
        run = fit(cfg, progress=False)
        rows = _metrics(run)
        assert len(rows) == 1 and rows[-1]["awp_active"] and rows[-1]["best_on"] == "test"
        saved = load_config(run / "config.yaml")
        assert saved.attack.kind == kind and saved.attack.alpha == pytest.approx(0.25 if kind == "fgsm" else 0.05)


def test_pgd_restarts_change_the_training_attack(tmp_path):
    base = [*TINY, "epochs=1", "awp.gamma=0", "attack.steps=2", f"out_dir={tmp_path}"]
    one = _metrics(fit(load_config("recipes/digits_at.yaml", [*base, "name=r1"]), progress=False))
    two = _metrics(fit(load_config("recipes/digits_at.yaml", [*base, "name=r2", "attack.restarts=2"]), progress=False))
    assert one[0]["train_loss"] != two[0]["train_loss"]


def test_hold_out_keeps_the_training_subset_and_draws_validation_from_the_rest():
    info = object()
    data = TensorData(torch.arange(50.0).view(50, 1, 1, 1) / 50, torch.arange(50), info)
    sub = data.subset(10, seed=3)
    train, val, idx = hold_out(data, 10, 7, seed=3)
    assert torch.equal(train.y, sub.y) and len(val) == 7 and not set(idx) & set(train.y.tolist())
    assert hold_out(data, 10, 7, seed=3)[2] == idx != hold_out(data, 10, 7, seed=4)[2]
    full_train, full_val, full_idx = hold_out(data, 0, 5, seed=0)
    assert len(full_train) == 45 and sorted(full_train.y.tolist() + full_idx) == list(range(50))
    assert hold_out(data, 0, 0, seed=0)[1] is None
    with pytest.raises(UserError, match="data.val_subset=41 must be smaller than the 40 images"):
        hold_out(data, 10, 41, seed=0)
    with pytest.raises(UserError, match="50-image training set"):
        hold_out(data, 0, 50, seed=0)


def test_val_subset_chooses_best_pt_and_is_recorded(tmp_path):
    cfg = load_config("recipes/digits_at.yaml", [*TINY, "attack.steps=2", "data.val_subset=40", "data.cutout=3", f"out_dir={tmp_path}"])
    run = fit(cfg, progress=False)
    rows = _metrics(run)
    assert all(r["best_on"] == "val" and 0 <= r["val_robust_acc"] <= 1 for r in rows)
    split = json.loads((run / "data.json").read_text())["val_split"]
    assert split["n"] == 40 and split["train_subset"] == 128 and len(set(split["indices"])) == 40
    best = torch.load(run / "best.pt", weights_only=True)["epoch"]
    assert best == max(rows, key=lambda r: r["val_robust_acc"])["epoch"]


def test_l1_and_l2_as_the_official_flags(tmp_path):
    from flatrobust.train import build

    cfg = load_config("recipes/digits_at.yaml", [*TINY, "optim.l2=0.01"])
    groups = build(cfg).optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and all(p.dim() > 1 for p in groups[0]["params"])
    assert all(p.dim() <= 1 or not p.requires_grad for p in groups[1]["params"])  # BatchNorm, biases (and frozen)
    base = [*TINY, "epochs=1", "attack.steps=1", f"out_dir={tmp_path}"]
    plain = _metrics(fit(load_config("recipes/digits_at.yaml", [*base, "name=plain"]), progress=False))[0]["train_loss"]
    l1 = _metrics(fit(load_config("recipes/digits_at.yaml", [*base, "name=l1", "optim.l1=0.001"]), progress=False))[0]["train_loss"]
    assert l1 > plain  # the logged loss includes the penalty


@pytest.mark.parametrize("override, message", [
    ("optim.schedule=superconverg", "did you mean 'superconverge'?"),
    ("data.val_subset=1000000", "data.val_subset=1000000 must be smaller than"),
    ("attack.kind=fgsmm", "attack.kind must be one of pgd, fgsm, free, none"),
    ("attack.restarts=0", "attack.restarts must be >= 1"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, override, message):
    rc = main(["train", "recipes/digits_at.yaml", *TINY, override, f"out_dir={tmp_path}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and not any(tmp_path.iterdir())


def test_combinations_that_make_no_sense_are_refused():
    for overrides, why in [(["attack.kind=none", "method=trades"], "standard training"),
                           (["attack.kind=fgsm", "attack.init=zero", "method=trades"], "gradient vanishes"),
                           (["attack.kind=fgsm", "attack.restarts=2"], "applies to the PGD"),
                           (["data.mixup_alpha=1", "method=trades"], "no soft-label form"),
                           (["data.mixup_alpha=1", "method=mart"], "no soft-label form")]:
        with pytest.raises(UserError, match=why):
            load_config(None, overrides)


def _fire_at(epoch):
    def check(self, e, test_acc, train_acc):
        if e == epoch:
            self.fired.append(e)
            return f"catastrophic overfitting at epoch {e}: test"
        return None
    return check


@pytest.mark.parametrize("mode", ["warn", "stop", "rollback"])
def test_catastrophic_guard_is_recorded_and_acts(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(catastrophic.CatastrophicOverfitting, "check", _fire_at(2))

    collapse_robust_accuracy(monkeypatch, call=3)  # the second epoch's (pass's) test PGD accuracy falls to 0
    cfg = load_config("recipes/digits_at.yaml", [*TINY, "epochs=3", "attack.steps=1", f"guard.catastrophic={mode}",
                                                 f"out_dir={tmp_path}"])
    run = fit(cfg, progress=False)
    rows = _metrics(run)
    assert [("catastrophic" in r) for r in rows] == ([False, True, False] if mode != "stop" else [False, True])
    assert rows[1]["catastrophic"].startswith("catastrophic overfitting at epoch 2") and f"guard.catastrophic={mode}" in rows[1]["catastrophic"]
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["catastrophic"]["fired"] == [2]
    if mode == "rollback":  # epoch 2 was worse than epoch 1 here: back to epoch 1's weights, and epoch 3 trains on from them
        assert rows[1]["test_robust_acc"] <= rows[0]["test_robust_acc"] and "rolled back to best.pt's epoch" in rows[1]["catastrophic"]
        best = torch.load(run / "best.pt", weights_only=True)
        assert best["epoch"] == 1 and rows[2]["epoch"] == 3


def test_mixup_trains_at_with_awp_on_soft_labels_equal_to_the_mixed_loss(tmp_path):
    from flatrobust.mixup import mixup

    torch.manual_seed(0)
    x, y, logits = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 3, 4, 5]), torch.randn(6, 10)
    mixed = mixup(x, y, 1.0)
    assert 0 < mixed.lam < 1
    assert torch.allclose(nn.functional.cross_entropy(logits, mixed.soft_targets(10)), mixed.loss(logits))
    cfg = load_config("recipes/digits_at_awp.yaml", [*TINY, "epochs=1", "awp.warmup=0", "attack.steps=1", "data.mixup_alpha=1",
                                                     f"out_dir={tmp_path}", "name=mix"])
    mix = _metrics(fit(cfg, progress=False))[0]
    plain = _metrics(fit(load_config("recipes/digits_at_awp.yaml", [*TINY, "epochs=1", "awp.warmup=0", "attack.steps=1",
                                                                    f"out_dir={tmp_path}", "name=plain"]), progress=False))[0]
    assert mix["awp_active"] and mix["train_loss"] != plain["train_loss"] and 0 <= mix["train_batch_adv_acc"] <= 1


def test_fgsm_from_the_previous_perturbation_resumes_exactly(tmp_path):
    """FGSM's carried perturbation (attack.init=previous) and the catastrophic check's state are in every checkpoint:
    a run stopped inside an epoch and resumed ends as an uninterrupted one, metrics included."""
    over = [*TINY, "epochs=2", "data.train_subset=256", "checkpoint_every=1", "attack.kind=fgsm", "attack.init=previous",
            "attack.alpha=null", "awp.gamma=0.01", f"out_dir={tmp_path}"]
    full = fit(load_config("recipes/digits_at.yaml", [*over, "name=full"]), progress=False)
    cfg = load_config("recipes/digits_at.yaml", [*over, "name=cut"])
    cut = fit(cfg, progress=False, stop_after_steps=6)  # inside epoch 2 (4 steps per epoch)
    assert torch.load(cut / "last.pt", weights_only=True)["objective"]["previous"] is not None
    fit(cfg, resume_dir=cut, progress=False)
    a, b = torch.load(full / "last.pt", weights_only=True), torch.load(cut / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["objective"]["previous"], b["objective"]["previous"]) and a["catastrophic"] == b["catastrophic"]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith(("_time_s", "_per_s"))} for r in rows]  # noqa: E731
    assert strip(_metrics(full)) == strip(_metrics(cut))


@pytest.mark.slow
def test_catastrophic_overfitting_really_happens_with_fgsm_from_zero_and_a_large_step(tmp_path):
    """The known trigger (Wong et al. 2020): FGSM from x with step 2 eps, digits, SmallCNN, eps 0.3, a constant rate. At
    epoch 3 the test PGD-10 accuracy falls from 10.0% to 3.5% while the FGSM accuracy on the training batches rises
    (13.9% -> 17.5%); guard.catastrophic=stop ends the run there."""
    cfg = load_config("recipes/digits_at.yaml", ["attack.kind=fgsm", "attack.init=zero", "attack.alpha=0.6", "attack.eps=0.3",
                                                 "eval.steps=10", "epochs=6", "data.eval_subset=200", "optim.schedule=constant",
                                                 "guard.catastrophic=stop", f"out_dir={tmp_path}"])
    rows = _metrics(fit(cfg, progress=False))
    assert len(rows) == 3 and rows[-1]["catastrophic"].startswith("catastrophic overfitting at epoch 3")
    assert rows[-1]["test_robust_acc"] < rows[1]["test_robust_acc"] / 2 and rows[-1]["train_batch_adv_acc"] > rows[1]["train_batch_adv_acc"]
