"""Free adversarial training (Shafahi et al., NeurIPS 2019) as attack.kind=free: the carried perturbation, the replays of the
training loop, the epoch division, AWP on top, exact resume, and the one-line refusals (issue 32)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import collapse_robust_accuracy
import torch
import torch.nn.functional as F
from torch import nn

from flatrobust import AWP, rundir
from flatrobust.attacks import AttackConfig, FreePerturbation, fgsm_train
from flatrobust.cli import main
from flatrobust.config import load_config
from flatrobust.errors import UserError
from flatrobust.objectives import create_objective
from flatrobust.train import EpochPlan, fit, train_step

TINY = ["data.train_subset=128", "data.eval_subset=32", "batch_size=48", "attack.eps=0.2", "eval.steps=2", "optim.lr=0.05",
        "attack.kind=free", "attack.alpha=null", "awp.gamma=0"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(5, 3, 2, 2, generator=g, dtype=torch.float64), torch.rand(4, 3, 2, 2, generator=g, dtype=torch.float64)
    return [(x1, torch.tensor([0, 1, 2, 0, 1])), (x2, torch.tensor([2, 2, 0, 1]))]


def _reference(model, batches, *, m, eps, lr, gamma=0.0):
    """Shafahi et al.'s Algorithm 1 written out by hand (with AWP's perturbation per replay, Wu et al. 2020): one delta
    of the first batch's shape, zero at the start and never reset; per replay one backward pass at w (+ v) gives the
    weight gradient and the input gradient; delta <- clip_eps(delta + eps * sign(g)), x + delta kept in [0, 1]."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    delta = torch.zeros_like(batches[0][0])
    for x, y in batches:
        n = len(x)
        for _ in range(m):
            xa = torch.min(torch.max(x + delta[:n], x - eps), x + eps).clamp(0, 1).requires_grad_(True)
            weights = [p for p in model.parameters() if p.dim() > 1]
            v = []
            if gamma:
                g = torch.autograd.grad(F.cross_entropy(model(xa), y), weights)
                v = [gamma * w.norm() * gw / (gw.norm() + 1e-20) for w, gw in zip(weights, g)]
                with torch.no_grad():
                    for w, vw in zip(weights, v):
                        w += vw
            loss = F.cross_entropy(model(xa), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for w, vw in zip(weights, v):
                    w -= vw
                delta[:n] = torch.min(torch.max(xa + eps * xa.grad.sign(), x - eps), x + eps).clamp(0, 1) - x
    return delta


@pytest.mark.parametrize("gamma", [0.0, 0.01])
def test_train_step_replays_equal_the_papers_algorithm_written_by_hand(gamma):
    """2 batches (5 then 4 images) x 3 replays in float64: weights and the carried delta match a hand-written Free AT
    (with AWP: perturbed at the current x + delta, one backward at w + v for both gradients) to 1e-10."""
    eps, lr, batches = 0.1, 0.05, _batches()
    ref_model, model = _model(), _model()
    ref_delta = _reference(ref_model, batches, m=3, eps=eps, lr=lr, gamma=gamma)
    objective = create_objective("at", AttackConfig(eps=eps, kind="free", replays=3))
    assert objective.attack_config.alpha == eps  # the paper's step
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    awp = AWP(model, gamma=gamma) if gamma else None
    for x, y in batches:
        for _ in range(3):
            train_step(model, objective, opt, x, y, awp=awp)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)
    assert torch.allclose(objective.free.delta, ref_delta, atol=1e-10, rtol=0) and objective.free.delta.shape[0] == 5
    assert ref_delta[4].abs().max() > 0  # the row the short batch left alone keeps the first batch's perturbation


def test_delta_persists_across_replays_and_batches():
    model, (b1, b2) = _model(), _batches()
    objective = create_objective("at", AttackConfig(eps=0.1, kind="free", replays=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = objective.attack(model, *b1)
    assert torch.equal(first, b1[0])  # zero at the start of training
    train_step(model, objective, opt, *b1)
    after_one = objective.free.delta.clone()
    assert after_one.abs().max() > 0
    second = objective.attack(model, *b1)  # the next replay starts where the last one left delta
    assert torch.equal(second, (b1[0] + after_one).clamp(0, 1))
    train_step(model, objective, opt, *b1)
    carried = objective.free.delta.clone()
    on_next = objective.attack(model, *b2)  # and so does the next batch: its first 4 rows
    assert torch.equal(on_next, torch.min(torch.max(b2[0] + carried[:4], b2[0] - 0.1), b2[0] + 0.1).clamp(0, 1))
    assert not torch.equal(on_next, b2[0])


def test_one_replay_moves_delta_as_fgsm_from_zero_with_step_eps_and_trains_on_the_clean_batch():
    model, (b1, _) = _model(), _batches()
    start = [p.detach().clone() for p in model.parameters()]
    fgsm = fgsm_train(model, *b1, eps=0.1, alpha=0.1, start="zero", mode="train")
    clean_loss = F.cross_entropy(model(b1[0]), b1[1])
    objective = create_objective("at", AttackConfig(eps=0.1, kind="free", replays=1))
    loss = train_step(model, objective, torch.optim.SGD(model.parameters(), lr=0.05), *b1).loss
    assert torch.allclose(objective.free.delta, fgsm - b1[0], atol=1e-12, rtol=0)  # the gradient at the weights before the step
    assert torch.allclose(loss, clean_loss.detach()) and not all(torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_free_trades_moves_delta_with_the_kl_gradient_from_trades_start():
    model, (b1, _) = _model(), _batches()
    x, y = b1
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    xa = torch.min(torch.max(x + 0.001 * noise, x - 0.1), x + 0.1).clamp(0, 1).requires_grad_(True)
    kl = F.kl_div(F.log_softmax(model(xa), 1), F.softmax(model(x), 1).detach(), reduction="batchmean")
    (grad,) = torch.autograd.grad(kl, xa)
    expected = torch.min(torch.max(xa + 0.1 * grad.sign(), x - 0.1), x + 0.1).clamp(0, 1) - x
    objective = create_objective("trades", AttackConfig(eps=0.1, kind="free", replays=2), beta=6.0)
    train_step(model, objective, torch.optim.SGD(model.parameters(), lr=0.05), x, y, generator=g)
    assert torch.allclose(objective.free.delta, expected.detach(), atol=1e-12, rtol=0)


def test_free_perturbation_shapes_and_l2_step():
    free = FreePerturbation(eps=0.5, alpha=0.5, norm="l2")
    x = torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64)
    xa = free.apply(x)
    grad = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 2.0], dtype=torch.float64).view(2, 1, 2, 2)
    free.update(x, xa, grad)
    assert torch.allclose(free.delta.flatten(1).norm(dim=1), torch.tensor([0.5, 0.5], dtype=torch.float64))  # g / ||g|| * alpha
    assert free.delta[0, 0, 0, 0] == pytest.approx(0.5) and free.delta[1, 0, 1, 1] == pytest.approx(0.5)
    free.apply(torch.full((3, 1, 2, 2), 0.5, dtype=torch.float64))  # a larger batch: new rows from the start, the others kept
    assert free.delta.shape[0] == 3 and free.delta[2].abs().max() == 0 and free.delta[0, 0, 0, 0] == pytest.approx(0.5)
    free.update(x, free.apply(x), torch.full_like(grad, float("nan")))  # a non-finite gradient leaves delta where it was
    assert torch.isfinite(free.delta).all() and free.delta[0, 0, 0, 0] == pytest.approx(0.5)
    free.apply(torch.zeros(2, 1, 3, 3, dtype=torch.float64))  # another image shape: a new delta
    assert free.delta.shape == (2, 1, 3, 3) and free.delta.abs().max() == 0


def test_fit_replays_each_batch_m_times_over_ceil_epochs_over_m_passes(tmp_path, monkeypatch):
    """epochs=3 with m=2: 2 passes (rounded up: 4 epochs' SGD steps) over 3 batches of 128 images, each batch 2 consecutive SGD steps with the lr of its global
    step, the EMA updated after every one, AWP from the SGD step of standard epoch awp.warmup=1 (inside the first pass)."""
    from flatrobust import train

    calls, step = [], train.train_step

    def recording(model, objective, optimizer, x, y, *, awp=None, **kw):
        calls.append((x.clone(), optimizer.param_groups[0]["lr"], awp is not None and awp.started))
        return step(model, objective, optimizer, x, y, awp=awp, **kw)
    monkeypatch.setattr(train, "train_step", recording)
    cfg = load_config("recipes/digits_at.yaml", [*TINY, "epochs=3", "attack.replays=2", "awp.gamma=0.01", "awp.warmup=1",
                                                 "ema.decay=0.9", "optim.schedule=official_piecewise", f"out_dir={tmp_path}"])
    run = fit(cfg, progress=False)
    plan = EpochPlan(cfg, n_labeled=128)
    assert (plan.epochs, plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (2, 3, 6, 12)
    assert len(calls) == 12
    assert all(torch.equal(calls[i][0], calls[i + 1][0]) for i in range(0, 12, 2))  # the same batch, replayed
    assert not torch.equal(calls[1][0], calls[2][0])
    assert [c[1] for c in calls] == [plan.lr(s) for s in range(12)] and calls[-1][1] == pytest.approx(0.05 / 100)
    assert [c[2] for c in calls] == [False] * 3 + [True] * 9  # awp.warmup=1 standard epoch = 3 SGD steps
    rows = _metrics(run)
    assert [(r["epoch"], r["step"], r["replays"], r["standard_epochs"]) for r in rows] == [(1, 6, 2, 2), (2, 12, 2, 4)]
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["ema"]["num_updates"] == 12 and last["objective"]["free"]["delta"].shape == (48, 1, 8, 8)
    saved = load_config(run / "config.yaml")
    assert (saved.attack.kind, saved.attack.replays, saved.attack.alpha) == ("free", 2, 0.2)
    assert rundir.finished(run)


def test_free_resumes_exactly_from_inside_a_pass(tmp_path):
    """The carried delta is in every checkpoint: a run stopped inside its second pass and resumed ends as an uninterrupted
    one (weights, delta, metrics), with AWP; checkpoint_every counts SGD steps and lands at batch ends."""
    over = [*TINY, "epochs=4", "attack.replays=2", "batch_size=64", "data.train_subset=256", "checkpoint_every=3",
            "awp.gamma=0.01", "awp.warmup=0", f"out_dir={tmp_path}"]
    full = fit(load_config("recipes/digits_at.yaml", [*over, "name=full"]), progress=False)
    cfg = load_config("recipes/digits_at.yaml", [*over, "name=cut"])
    cut = fit(cfg, progress=False, stop_after_steps=14)  # pass 2 (8 SGD steps a pass), after its 3rd batch
    state = torch.load(cut / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 3)  # at batch ends whose steps (4, 6) pass a multiple of checkpoint_every=3
    assert state["objective"]["free"]["delta"].abs().max() > 0
    fit(cfg, resume_dir=cut, progress=False)
    a, b = torch.load(full / "last.pt", weights_only=True), torch.load(cut / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["objective"]["free"]["delta"], b["objective"]["free"]["delta"])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith(("_time_s", "_per_s"))} for r in rows]  # noqa: E731
    assert strip(_metrics(full)) == strip(_metrics(cut)) and len(_metrics(full)) == 2


def test_covers_counts_the_passes_of_free_at():
    config = {"epochs": 5, "attack": {"kind": "free", "replays": 2}}
    assert rundir.loop_epochs(config) == 3 and rundir.covers(config, [{}] * 3) and not rundir.covers(config, [{}] * 2)
    assert rundir.loop_epochs({"epochs": 5, "attack": {"kind": "pgd"}}) == 5


@pytest.mark.parametrize("override, message", [
    (["attack.replays=0"], "attack.replays must be >= 1, got 0"),
    (["attack.replays=2.5"], "attack.replays must be an integer, got 2.5"),
    (["attack.kind=pgd", "attack.replays=4"], "attack.replays=4 applies to Free AT (attack.kind=free), not attack.kind=pgd"),
    (["attack.restarts=2"], "attack.restarts=2 applies to the PGD training attack, not attack.kind=free"),
    (["attack.init=zero"], "attack.init=zero is FGSM's start"),
    (["method=mart"], "Free AT with MART"),
])
def test_bad_free_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, override, message):
    rc = main(["train", "recipes/digits_at.yaml", *TINY, *override, f"out_dir={tmp_path}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and not any(tmp_path.iterdir())


def test_the_library_refuses_free_mart_and_bad_replays():
    with pytest.raises(ValueError, match="Free AT with MART"):
        create_objective("mart", AttackConfig(eps=0.1, kind="free"))
    with pytest.raises(ValueError, match="replays must be an integer >= 1"):
        AttackConfig(eps=0.1, kind="free", replays=0)
    assert AttackConfig(eps=0.1, kind="free").replays == 8 and AttackConfig(eps=0.1).as_dict().keys() == {"norm", "eps", "alpha", "steps"}
    with pytest.raises(UserError, match="applies to Free AT"):
        load_config(None, ["attack.replays=2"])


def test_catastrophic_rollback_takes_delta_back_with_the_weights(tmp_path, monkeypatch):
    """guard.catastrophic=rollback under Free AT: the check fires after pass 2 (its test PGD accuracy made to collapse), and
    the weights and the carried delta go back to best.pt's pass before last.pt is written."""
    from flatrobust import catastrophic

    def fire_at_2(self, epoch, test_acc, train_acc):
        return f"catastrophic overfitting at epoch {epoch}: test" if epoch == 2 else None
    monkeypatch.setattr(catastrophic.CatastrophicOverfitting, "check", fire_at_2)
    collapse_robust_accuracy(monkeypatch, call=3)  # the second epoch's (pass's) test PGD accuracy falls to 0
    cfg = load_config("recipes/digits_at.yaml", [*TINY, "epochs=4", "attack.replays=2", "guard.catastrophic=rollback",
                                                 f"out_dir={tmp_path}"])
    run = fit(cfg, progress=False)
    rows = _metrics(run)
    assert len(rows) == 2 and "rolled back to best.pt's epoch" in rows[1]["catastrophic"]
    best, last = torch.load(run / "best.pt", weights_only=True), torch.load(run / "last.pt", weights_only=True)
    assert best["epoch"] == 1 and last["epoch"] == 2
    assert torch.equal(last["objective"]["free"]["delta"], best["objective"]["free"]["delta"])
    assert all(torch.equal(last["model"][k], best["model"][k]) for k in best["model"])



def test_a_step_that_nonfinite_skip_undoes_leaves_delta_as_it_was():
    from flatrobust.guard import Rollback

    free, x = FreePerturbation(eps=0.1, alpha=0.1), torch.full((2, 1, 2, 2), 0.5)
    free.update(x, free.apply(x), torch.ones_like(x), keep=torch.tensor(True))  # a finite gradient, but the step is undone
    assert free.delta.abs().max() == 0
    free.update(x, free.apply(x), torch.ones_like(x), keep=torch.tensor(False))
    assert torch.allclose(free.delta, torch.full_like(x, 0.1))
    model, (b1, _) = _model(), _batches()  # in train_step: a non-finite step under nonfinite=skip
    objective = create_objective("at", AttackConfig(eps=0.1, kind="free", replays=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train_step(model, objective, opt, *b1)
    before = objective.free.delta.clone()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    result = train_step(model, objective, opt, *b1, rollback=Rollback(model, opt))
    assert not result.finite and torch.equal(objective.free.delta, before)
