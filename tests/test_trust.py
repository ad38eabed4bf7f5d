"""Trust checks: each flag fires on the kind of model it is meant to catch, and sound models pass them all."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatrobust import pgd
from flatrobust.trust import CHECKS, format_checks, run_checks, slack

EPS = 0.1  # L-inf, pixel units: PGD-20 takes a natural digits CNN from ~98% to ~50%
N = 64  # examples the checks run on in these tests


@pytest.fixture(scope="module")
def robust_cnn(trained_cnn, digits):
    """The natural CNN fine-tuned by PGD-3 adversarial training at eps=EPS for 2 epochs (a few seconds)."""
    xtr, ytr, _, _ = digits
    model = copy.deepcopy(trained_cnn)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            x_adv = pgd(model, xtr[idx], ytr[idx], eps=EPS, alpha=EPS / 2, steps=3, mode="eval", generator=g)
            model.train()
            loss = F.cross_entropy(model(x_adv), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class Quantized(nn.Module):
    """Inputs rounded to 5 grey levels before the model: round() has a zero gradient everywhere, the
    textbook gradient masking (Athalye et al. 2018) that makes PGD blind without making the model robust."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


class Probabilities(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), dim=1)


class Noisy(nn.Module):
    """Randomized logits, in eval mode too (as a noise-injection defense)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        return logits + 0.5 * torch.randn_like(logits)


def _subset(digits, n=N):
    _, _, x, y = digits
    return x[:n], y[:n]


def _by_name(checks):
    return {c["name"]: c for c in checks}


def test_registry_is_complete_and_every_check_says_what_it_suggests():
    assert set(CHECKS) == {"huge_eps", "monotone_eps", "pgd_le_fgsm", "more_steps_no_better", "square_not_better",
                           "finite_nonzero_input_grads", "logits_not_probabilities", "deterministic_forward",
                           "in_ball_and_box"}
    assert all(len(suggests) > 20 for _, suggests in CHECKS.values())
    assert slack(64) == 1 and slack(200) == 1 and slack(1000) == 5


@pytest.mark.parametrize("which", ["natural", "robust"])
def test_sound_models_pass_every_check(which, trained_cnn, robust_cnn, digits):
    model = trained_cnn if which == "natural" else robust_cnn
    x, y = _subset(digits)
    checks = run_checks(model, x, y, norm="linf", eps=EPS)
    assert [c["name"] for c in checks] == list(CHECKS)
    assert all(set(c) == {"name", "passed", "detail", "suggests"} for c in checks)
    failed = [c for c in checks if not c["passed"]]
    assert not failed, format_checks(failed)
    assert not model.training


def test_robust_fixture_is_more_robust_than_the_natural_model(trained_cnn, robust_cnn, digits):
    x, y = _subset(digits)
    acc = {}
    for name, model in (("natural", trained_cnn), ("robust", robust_cnn)):
        x_adv = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=20, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            acc[name] = (model(x_adv).argmax(1) == y).float().mean().item()
    assert acc["robust"] > acc["natural"] + 0.1, acc


def test_gradient_masking_is_flagged(trained_cnn, digits):
    x, y = _subset(digits)
    checks = _by_name(run_checks(Quantized(trained_cnn), x, y, norm="linf", eps=EPS,
                                 names=["finite_nonzero_input_grads", "huge_eps", "square_not_better"]))
    assert not checks["finite_nonzero_input_grads"]["passed"]
    assert f"{N} exactly zero" in checks["finite_nonzero_input_grads"]["detail"]
    assert not checks["huge_eps"]["passed"], checks["huge_eps"]["detail"]


def test_probabilities_are_flagged(trained_cnn, digits):
    x, y = _subset(digits)
    flagged = _by_name(run_checks(Probabilities(trained_cnn), x, y, norm="linf", eps=EPS, names=["logits_not_probabilities"]))
    assert not flagged["logits_not_probabilities"]["passed"]
    clean = _by_name(run_checks(trained_cnn, x, y, norm="linf", eps=EPS, names=["logits_not_probabilities"]))
    assert clean["logits_not_probabilities"]["passed"]


def test_randomized_forward_is_flagged(trained_cnn, digits):
    x, y = _subset(digits)
    checks = _by_name(run_checks(Noisy(trained_cnn), x, y, norm="linf", eps=EPS, names=["deterministic_forward"]))
    assert not checks["deterministic_forward"]["passed"]


def test_a_model_left_in_train_mode_is_checked_in_eval_mode(trained_cnn, digits):
    x, y = _subset(digits)
    model = copy.deepcopy(trained_cnn).train()  # BatchNorm in train mode would make outputs batch-dependent
    checks = run_checks(model, x, y, norm="linf", eps=EPS, names=["deterministic_forward", "logits_not_probabilities"])
    assert all(c["passed"] for c in checks)
    assert model.training  # its mode is given back


def test_full_evaluation_results_join_the_checks(trained_cnn, digits):
    """Numbers of the full evaluation that break the promises are flagged even when the subset looks fine."""
    x, y = _subset(digits, 16)
    results = {"n": 1000, "attacks": {
        "fgsm": {"correct": 500, "outside_threat_model": 0, "max_perturbation": EPS},
        "pgd20": {"correct": 400, "outside_threat_model": 3, "max_perturbation": 2 * EPS},
        "pgd100": {"correct": 420, "outside_threat_model": 0, "max_perturbation": EPS},  # more steps, higher: broken
        "autoattack": {"correct": 300, "outside_threat_model": 0, "max_perturbation": EPS, "warnings": ["a flag"],
                       "stages": {"apgd-ce": {"correct": 380}, "apgd-t": {"correct": 370}, "fab-t": {"correct": 365},
                                  "square": {"correct": 300}}},  # Square broke 65 points the white-box left
    }}
    checks = _by_name(run_checks(trained_cnn, x, y, norm="linf", eps=EPS, results=results,
                                 names=["more_steps_no_better", "square_not_better", "in_ball_and_box", "autoattack_flags"]))
    assert list(checks) == ["more_steps_no_better", "square_not_better", "autoattack_flags", "in_ball_and_box"]
    assert not any(c["passed"] for c in checks.values()), format_checks(list(checks.values()))
    assert "Square broke 65" in checks["square_not_better"]["detail"]
    assert "pgd20: 3 points outside" in checks["in_ball_and_box"]["detail"]


def test_unknown_check_name_is_refused(trained_cnn, digits):
    x, y = _subset(digits, 4)
    with pytest.raises(ValueError, match="unknown trust check"):
        run_checks(trained_cnn, x, y, norm="linf", eps=EPS, names=["huge_epz"])


def test_a_failed_check_prints_as_a_warning_line_with_its_suggestion():
    text = format_checks([
        {"name": "huge_eps", "passed": False, "detail": "12/64 correct", "suggests": "gradient masking"},
        {"name": "monotone_eps", "passed": True, "detail": "fine", "suggests": "x"},
    ])
    lines = text.splitlines()
    assert len(lines) == 2
    assert "WARNING" in lines[0] and "huge_eps" in lines[0] and "suggests: gradient masking" in lines[0]
    assert "WARNING" not in lines[1] and lines[1].split() == ["ok", "monotone_eps:", "fine"]
