"""Attack contracts and the sanity checks of the field (Carlini et al. 2019) on a small trained CNN."""
import pytest
import torch

from flatrobust import L2Ball, LinfBall, fgsm, pgd

from conftest import accuracy

EPS = {"linf": 0.1, "l2": 0.5}


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_stays_in_ball_and_box(trained_cnn, digits, norm, loss):
    _, _, x, y = digits
    x, y = x[:64], y[:64]
    eps = EPS[norm]
    x_adv = pgd(trained_cnn, x, y, eps=eps, alpha=eps / 4, steps=5, norm=norm, loss=loss)
    ball = LinfBall(eps) if norm == "linf" else L2Ball(eps)
    assert x_adv.shape == x.shape
    assert (ball.norm(x_adv - x) <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_accuracy_ordering_clean_fgsm_pgd(trained_cnn, digits, norm):
    _, _, x, y = digits
    eps = EPS[norm]
    torch.manual_seed(0)
    clean = accuracy(trained_cnn, x, y)
    acc_fgsm = accuracy(trained_cnn, fgsm(trained_cnn, x, y, eps=eps, norm=norm), y)
    acc_pgd = accuracy(trained_cnn, pgd(trained_cnn, x, y, eps=eps, alpha=eps / 4, steps=10, norm=norm), y)
    assert clean > 0.85
    assert clean >= acc_fgsm >= acc_pgd
    assert acc_pgd < clean - 0.2, "PGD at this eps must hurt a naturally trained model"


def test_more_steps_and_restarts_do_not_help_the_model(trained_cnn, digits):
    _, _, x, y = digits
    torch.manual_seed(1)
    a5 = accuracy(trained_cnn, pgd(trained_cnn, x, y, eps=0.05, alpha=0.0125, steps=5), y)
    a20 = accuracy(trained_cnn, pgd(trained_cnn, x, y, eps=0.05, alpha=0.0125, steps=20, restarts=3), y)
    assert a20 <= a5 + 0.01


def test_eps_zero_changes_nothing_and_huge_eps_breaks_everything(trained_cnn, digits):
    _, _, x, y = digits
    assert torch.equal(pgd(trained_cnn, x, y, eps=0.0, alpha=0.01, steps=3), x)
    assert accuracy(trained_cnn, pgd(trained_cnn, x, y, eps=1.0, alpha=0.25, steps=20), y) < 0.05


def test_cw_attack_is_strong(trained_cnn, digits):
    _, _, x, y = digits
    acc = accuracy(trained_cnn, pgd(trained_cnn, x, y, eps=0.1, alpha=0.025, steps=10, loss="cw"), y)
    assert acc < accuracy(trained_cnn, x, y) - 0.2


def test_mode_grad_and_buffers_untouched(trained_cnn, digits):
    _, _, x, y = digits
    buffers = {n: b.clone() for n, b in trained_cnn.named_buffers()}
    grads_before = [None if p.grad is None else p.grad.clone() for p in trained_cnn.parameters()]
    pgd(trained_cnn, x[:32], y[:32], eps=0.1, alpha=0.02, steps=3)
    assert not trained_cnn.training
    for p, g in zip(trained_cnn.parameters(), grads_before):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    for n, b in trained_cnn.named_buffers():
        assert torch.equal(b, buffers[n]), n
    # mode="train" runs the attack in train mode and gives eval mode back
    pgd(trained_cnn, x[:32], y[:32], eps=0.1, alpha=0.02, steps=1, mode="train")
    assert not trained_cnn.training
    for b, name in zip(trained_cnn.buffers(), buffers):  # restore stats for the other tests
        b.copy_(buffers[name])


def test_reproducible_with_generator(trained_cnn, digits):
    _, _, x, y = digits
    a = pgd(trained_cnn, x[:16], y[:16], eps=0.1, alpha=0.02, steps=2, generator=torch.Generator().manual_seed(3))
    b = pgd(trained_cnn, x[:16], y[:16], eps=0.1, alpha=0.02, steps=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(eps=-0.1), "eps must be"),
        (dict(steps=0), "steps must be"),
        (dict(norm="l1"), "unknown norm 'l1'"),
        (dict(loss="hinge"), "unknown attack loss 'hinge'"),
        (dict(restarts=0), "restarts must be"),
    ],
)
def test_bad_arguments(trained_cnn, kwargs, match):
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    args = dict(eps=0.1, alpha=0.01, steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        pgd(trained_cnn, x, y, **args)


def test_inputs_outside_unit_box_are_rejected(trained_cnn):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(trained_cnn, torch.rand(2, 1, 8, 8) * 2 - 0.5, torch.tensor([0, 1]), eps=0.1, alpha=0.01, steps=1)
