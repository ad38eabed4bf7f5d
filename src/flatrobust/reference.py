"""A faithful re-implementation of the official AT-AWP procedure (Wu, Xia, Wang, NeurIPS 2020; its code,
github.com/csdongxian/AWP).

It is the yardstick, not the product: tests check that `flatrobust.AWP` gives the same weights as this
procedure, and `bench/` times it as the baseline. It reproduces what the official code does every step:

  - PGD with a full `loss.backward()` (weight gradients computed and thrown away), in train mode;
  - a proxy model reloaded from the model's `state_dict()` every step, one SGD step (lr `awp_lr`) on the
    NEGATED loss in train mode, then v_l = gamma * ||w_l|| * diff_l / (||diff_l|| + 1e-20) with
    diff = proxy - model, for every state_dict entry with dim > 1 whose key contains 'weight';
  - add v, forward/backward at w + v, optimizer step, subtract v;
  - the extra forward passes of the official loop (restart selection and logging).
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-20


def official_pgd(model: nn.Module, x, y, *, eps, alpha, steps, norm="linf", generator=None):
    """Rice et al.'s attack_pgd with one restart: full backward, then the restart-selection forward."""
    delta = torch.zeros_like(x)
    if norm == "linf":
        delta.uniform_(-eps, eps, generator=generator)
    else:
        delta.normal_(generator=generator)
        n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        r = torch.zeros_like(n).uniform_(0, 1, generator=generator)
        delta = delta / n * r * eps
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()  # the official code's full backward: weight gradients too
        g = delta.grad.detach()
        if norm == "linf":
            d = (delta + alpha * g.sign()).clamp(-eps, eps)
        else:
            gn = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12
            d = delta + alpha * g / gn
            dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = d * (eps / (dn + 1e-12)).clamp(max=1.0)
        d = (x + d).clamp(0, 1) - x
        delta.data = d
        delta.grad.zero_()
    with torch.no_grad():  # restart selection: the loss of the final delta, computed and kept per example
        F.cross_entropy(model(x + delta), y, reduction="none")
    return (x + delta).detach()


def diff_in_weights(model: nn.Module, proxy: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    diff = OrderedDict()
    for (k, w), (_, w_new) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if w.dim() <= 1 or "weight" not in k:
            continue
        d = w_new - w
        diff[k] = w.norm() / (d.norm() + EPS) * d
    return diff


def add_into_weights(model: nn.Module, diff, coeff: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in diff:
                p.add_(coeff * diff[name])


class OfficialAWP:
    """The official `AdvWeightPerturb`: a proxy model and its own SGD optimizer (lr = awp_lr)."""

    def __init__(self, model: nn.Module, gamma: float = 0.01, awp_lr: float = 0.01):
        self.model = model
        self.proxy = copy.deepcopy(model)
        self.proxy_optim = torch.optim.SGD(self.proxy.parameters(), lr=awp_lr)
        self.gamma = gamma

    def calc_awp(self, loss_fn) -> "OrderedDict[str, torch.Tensor]":
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss = -loss_fn(self.proxy)
        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()
        return diff_in_weights(self.model, self.proxy)

    def perturb(self, diff) -> None:
        add_into_weights(self.model, diff, self.gamma)

    def restore(self, diff) -> None:
        add_into_weights(self.model, diff, -self.gamma)


def official_at_awp_step(model, optimizer, awp: OfficialAWP | None, x, y, *, eps, alpha, steps, norm="linf",
                         generator=None):
    """One step of the official AT(-AWP) loop; returns the training loss (a float)."""
    model.train()
    x_adv = official_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=generator)
    diff = None
    if awp is not None:
        diff = awp.calc_awp(lambda m: F.cross_entropy(m(x_adv), y))
        awp.perturb(diff)
    out = model(x_adv)
    loss = F.cross_entropy(out, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if awp is not None:
        awp.restore(diff)
    with torch.no_grad():  # the official loop's logging forward on the natural batch
        model(x)
    return float(loss)
