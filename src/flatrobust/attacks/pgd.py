"""Projected gradient descent (Madry et al. 2018) and FGSM (Goodfellow et al. 2015), L-inf and L2.

Contract (as torchattacks): inputs and outputs in [0, 1]; x_adv stays in the eps ball; gradients are
taken with `torch.autograd.grad` with respect to the input only, so no weight gradient is computed and
the model's `.grad` is never touched; the model's train/eval mode is the same after the call as before.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..modes import train_mode
from .losses import ce_loss, cw_loss, cw_margin, kl_loss
from .threat import threat_model

LOSSES = ("ce", "cw", "kl")


def _check_inputs(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating-point image tensor in [0, 1], got dtype {x.dtype}")
    # One code path for every device and no host synchronization: on an accelerator the assertion fails
    # asynchronously (at the next sync); on the CPU it fails here, and the error names the range found.
    try:
        torch._assert_async(((x >= 0) & (x <= 1)).all(), "x must lie in [0, 1] (normalization belongs inside the model)")
    except RuntimeError:
        if x.device.type != "cpu":
            raise
        raise ValueError(f"x must lie in [0, 1] (normalization belongs inside the model), got values in "
                         f"[{float(x.min()):.4g}, {float(x.max()):.4g}]") from None


def _per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: str, p_nat: torch.Tensor | None) -> torch.Tensor:
    """(B,) loss used to pick the worst of several restarts."""
    if loss == "ce":
        return nn.functional.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        return cw_margin(logits, y)
    return nn.functional.kl_div(nn.functional.log_softmax(logits, 1), p_nat, reduction="none").sum(1)


def _natural_probs(model: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor | None:
    """TRADES' KL loss compares with the model's own prediction at x: computed once, before the attack; None otherwise."""
    if loss != "kl":
        return None
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    loss: str = "ce",
    random_start: bool = True,
    restarts: int = 1,
    mode: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD-`steps` attack; returns x_adv (B, C, H, W) in [0, 1] with ||x_adv - x|| <= eps.

    Args:
        model: maps images in [0, 1] to logits.
        x, y: images (B, C, H, W) in [0, 1] and labels (B,) (y unused for loss="kl").
        eps, alpha: radius of the ball and step size, in pixel units (e.g. 8/255 and 2/255 for L-inf).
        steps: number of gradient steps (>= 1).
        norm: "linf" or "l2".
        loss: "ce" (cross-entropy), "cw" (CW margin; CW-inf of the paper is PGD on it with norm="linf"),
            or "kl" (TRADES: KL to the natural prediction, start at x + 0.001 * N(0, 1)).
        random_start: start uniformly in the ball (ignored for "kl", which has its own start).
        restarts: independent runs; the one with the highest loss is kept per example.
        mode: "train" or "eval" to run the attack in that mode; None keeps the model's current mode.
        generator: torch.Generator for the random start (reproducible attacks).
    """
    ball = threat_model(norm, eps)
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}: use one of {', '.join(LOSSES)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if mode not in (None, "train", "eval"):
        raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
    if loss != "kl" and y is None:
        raise ValueError(f"loss={loss!r} needs labels y")
    _check_inputs(x)
    x = x.detach()
    if ball.eps == 0:
        return x.clone()
    training = model.training if mode is None else mode == "train"
    with train_mode(model, training):
        p_nat = _natural_probs(model, x, loss)
        best, best_loss = None, None
        for _ in range(restarts):
            x_adv = _pgd_once(model, x, y, ball, alpha, steps, loss, random_start, p_nat, generator)
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                per_ex = _per_example_loss(model(x_adv), y, loss, p_nat)
            if best is None:
                best, best_loss = x_adv, per_ex
            else:
                better = per_ex > best_loss
                best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
                best_loss = torch.where(better, per_ex, best_loss)
        return best


def _pgd_once(model, x, y, ball, alpha, steps, loss, random_start, p_nat, generator):
    if loss == "kl":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = ball.project(x + 0.001 * noise, x)
    elif random_start:
        x_adv = ball.random_init(x, generator)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        if loss == "ce":
            objective = ce_loss(logits, y)
        elif loss == "cw":
            objective = cw_loss(logits, y)
        else:
            objective = kl_loss(logits, p_nat)
        (grad,) = torch.autograd.grad(objective, x_adv)  # input gradient only: no weight-gradient work
        x_adv = ball.project(ball.step(x_adv.detach(), grad, alpha), x)
    return x_adv.detach()


def fgsm_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    eps: float,
    alpha: float,
    norm: str = "linf",
    loss: str = "ce",
    start: str | torch.Tensor = "random",
    mode: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FGSM as a training attack (Wong, Rice and Kolter 2020, "Fast is better than free", Algorithm 3): one step of
    size `alpha` (theirs: 1.25 eps) from `start`, projected to the eps ball and [0, 1].

    start: "zero" (x itself, Goodfellow et al.'s FGSM), "random" (uniform in the ball, Wong et al.'s FGSM-RS) or a
    perturbation tensor (B, C, H, W) to start from (`--fgsm-init previous`: the last batch's, as the official
    script keeps it). loss "kl" is TRADES' KL to the natural prediction (its gradient vanishes at x: start at random).
    """
    ball = threat_model(norm, eps)
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}: use one of {', '.join(LOSSES)}")
    _check_inputs(x)
    x = x.detach()
    training = model.training if mode is None else mode == "train"
    with train_mode(model, training):
        p_nat = _natural_probs(model, x, loss)
        if isinstance(start, torch.Tensor):
            x_adv = ball.project(x + start.to(x.dtype), x)
        elif start == "random":
            x_adv = ball.random_init(x, generator)
        elif start == "zero":
            x_adv = x.clone()
        else:
            raise ValueError(f"start must be 'zero', 'random' or a tensor, got {start!r}")
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        objective = ce_loss(logits, y) if loss == "ce" else cw_loss(logits, y) if loss == "cw" else kl_loss(logits, p_nat)
        (grad,) = torch.autograd.grad(objective, x_adv)
        return ball.project(ball.step(x_adv.detach(), grad, alpha), x).detach()


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    mode: str | None = None,
) -> torch.Tensor:
    """FGSM: one step of size eps from x, no random start (the fast gradient sign method for L-inf,
    a normalized gradient step for L2)."""
    return pgd(model, x, y, eps=eps, alpha=eps, steps=1, norm=norm, loss=loss, random_start=False, mode=mode)
