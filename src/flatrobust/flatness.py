"""Average- and worst-case flatness of the robust loss (Stutz, Hein, Schiele, ICCV 2021).

With rho(w) the robust loss (mean CE on PGD adversarial examples, see `landscape.robust_loss`) and a
layer-wise RELATIVE neighbourhood of w, ||nu_l|| <= xi * ||w_l|| for every perturbed tensor l:

    average-case flatness = E_nu[ rho(w + nu) ] - rho(w),      nu uniform on the sphere ||nu_l|| = xi * ||w_l||
    worst-case flatness   = max_{||nu_l|| <= xi ||w_l||} rho(w + nu) - rho(w)

Because the neighbourhood scales with each layer's norm, both measures are invariant to the rescalings
of ReLU networks that leave the function unchanged (w_l -> c * w_l, w_{l+1} -> w_{l+1} / c), which makes
flatness comparable across models; an absolute ball would not be.

Perturbed tensors: the weights AWP perturbs, `awp.perturbed_parameters` (every trainable parameter with dim > 1:
conv and linear weights). Biases, BatchNorm weight/bias, frozen weights and all buffers
(BatchNorm running statistics, the Normalize layer's mean/std) are never perturbed; the model is
evaluated in eval mode, so BatchNorm uses the running statistics stored with w.

PGD is re-run for every perturbed model, its random start reseeded with `seed` every time (common random
numbers): with xi = 0 both measures are exactly 0. The caller's model is never modified (a copy is).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import AttackConfig, threat_model
from .awp import perturbed_parameters
from .landscape import _check_data, check_attack, robust_loss
from .progress import Progress

__all__ = ["average_flatness", "relative_sphere_sample", "worst_flatness"]


def _check_xi(xi: float) -> float:
    if not isinstance(xi, (int, float)) or not math.isfinite(xi) or xi < 0:
        raise ValueError(f"xi must be a finite number >= 0, got {xi!r}")
    return float(xi)


@torch.no_grad()
def relative_sphere_sample(weights: Sequence[torch.Tensor], xi: float, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """nu_l uniform on the sphere ||nu_l|| = xi * ||w_l||, one per tensor of `weights`.

    A normalized Gaussian is uniform on the sphere. Drawn from `generator` on its own device (the global
    CPU RNG if None), then moved to the weight's device: a CPU generator gives the same nu on any device.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out = []
    for w in weights:
        u = torch.randn(w.shape, generator=generator, device=gen_device, dtype=w.dtype).to(w.device)
        out.append(u * (xi * w.norm() / (u.norm() + 1e-30)))
    return out


def average_flatness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: AttackConfig | dict[str, Any],
    xi: float = 0.5,
    draws: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """E_nu[rho(w + nu)] - rho(w), nu uniform on the layer-wise relative sphere, estimated with `draws` draws.

    Args:
        model: maps images in [0, 1] to logits; left bit-identical.
        x, y: evaluation examples (N, C, H, W) in [0, 1] and labels (N,).
        attack: the PGD that estimates rho (re-run for every draw): an `AttackConfig` or a dict {norm, eps, alpha, steps}.
        xi: relative radius, ||nu_l|| = xi * ||w_l|| (Stutz et al.: 0.5).
        draws: number of random nu (Stutz et al.: 10).
        seed: nu from `torch.Generator().manual_seed(seed)`; PGD random starts reseeded with `seed`.
        progress: report progress over the draws on stderr (`flatrobust.progress`).

    Returns a JSON-ready dict: "average_flatness" (nats), "robust_loss" rho(w) and "robust_accuracy" at w,
    "perturbed_losses" / "perturbed_accuracies" (one per draw), their mean, "standard_error" of the mean
    over draws, and the settings ("xi", "draws", "attack", "n", "seed", "perturbed").
    """
    attack = check_attack(attack)
    xi = _check_xi(xi)
    _check_data(x, y, batch_size)
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    net = copy.deepcopy(model).eval()
    named = perturbed_parameters(net)
    params = [p for _, p in named]
    w0 = [p.detach().clone() for p in params]
    rho_w, acc_w = robust_loss(net, x, y, attack=attack, batch_size=batch_size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    losses, accs = [], []
    for _ in Progress(range(draws), desc="average flatness", unit="draw", enabled=progress):
        nu = relative_sphere_sample(w0, xi, generator)
        with torch.no_grad():
            for p, w, v in zip(params, w0, nu):
                p.copy_(w + v)
        loss, acc = robust_loss(net, x, y, attack=attack, batch_size=batch_size, seed=seed)
        losses.append(loss)
        accs.append(acc)
    mean = sum(losses) / draws
    std = math.sqrt(sum((v - mean) ** 2 for v in losses) / (draws - 1)) if draws > 1 else float("nan")
    return {
        "measure": "average",
        "average_flatness": mean - rho_w,
        "robust_loss": rho_w,
        "robust_accuracy": acc_w,
        "perturbed_loss_mean": mean,
        "perturbed_accuracy_mean": sum(accs) / draws,
        "standard_error": std / math.sqrt(draws) if draws > 1 else None,
        "perturbed_losses": losses,
        "perturbed_accuracies": accs,
        "xi": xi,
        "draws": draws,
        "attack": attack,
        "n": int(x.shape[0]),
        "batch_size": batch_size,
        "seed": seed,
        "perturbed": [n for n, _ in named],
    }


def worst_flatness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: AttackConfig | dict[str, Any],
    xi: float = 0.003,
    steps: int = 20,
    weight_step: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """max_{||nu_l|| <= xi ||w_l||} rho(w + nu) - rho(w), the max found by a joint weight + input attack.

    The joint attack starts at nu = 0 and x' uniform in the input ball, and for `steps` iterations takes
    ONE backward pass of the summed CE at (x', w + nu) per batch, which gives both gradients, then
      - inputs: one PGD step of size attack["alpha"], projected to the eps ball and [0, 1] (per batch);
      - weights: with g_l the gradient summed over all N examples (one nu for the whole data),
        nu_l <- nu_l + weight_step * xi * ||w_l|| * g_l / ||g_l||   (normalized layer-wise ascent step)
        nu_l <- nu_l * min(1, xi * ||w_l|| / ||nu_l||)               (projection to the relative ball)
    The worst-case loss is then rho(w + nu*) with the same fresh PGD (same attack, same seed) as rho(w),
    so both terms of the difference are measured alike and xi = 0 gives exactly 0.

    Args:
        xi: relative radius of the ball (Stutz et al.: 0.003).
        steps: joint attack iterations (Stutz et al.: 20).
        weight_step: weight step as a fraction of the radius xi * ||w_l||; default 2.5 / steps (the usual
            PGD rule of thumb: the boundary is reachable in 40% of the iterations).
        Others as in `average_flatness`.

    Returns a JSON-ready dict: "worst_flatness" (nats), "robust_loss" rho(w), "robust_accuracy",
    "perturbed_loss" rho(w + nu*), "perturbed_accuracy", "joint_loss" (mean CE at the joint attack's last
    (x', w + nu)), "relative_norms" ||nu_l|| / ||w_l|| per perturbed tensor, and the settings.
    """
    attack = check_attack(attack)
    xi = _check_xi(xi)
    _check_data(x, y, batch_size)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    weight_step = 2.5 / steps if weight_step is None else float(weight_step)
    if not math.isfinite(weight_step) or weight_step < 0:
        raise ValueError(f"weight_step must be a finite number >= 0, got {weight_step!r}")
    net = copy.deepcopy(model).eval()
    named = perturbed_parameters(net)
    params = [p for _, p in named]
    for p in net.parameters():  # gradients are needed for the perturbed weights only
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    w0 = [p.detach().clone() for p in params]
    radius = [xi * float(w.norm()) for w in w0]  # xi * ||w_l||
    rho_w, acc_w = robust_loss(net, x, y, attack=attack, batch_size=batch_size, seed=seed)

    ball = threat_model(attack["norm"], attack["eps"])
    generator = torch.Generator(device=x.device).manual_seed(seed)
    x_adv = ball.random_init(x, generator)  # (N, C, H, W)
    nu = [torch.zeros_like(w) for w in w0]
    n = x.shape[0]
    for _ in Progress(range(steps), desc="worst flatness", unit="step", enabled=progress):
        grads = [torch.zeros_like(w) for w in w0]
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            xa = x_adv[start : start + batch_size].clone().requires_grad_(True)
            loss = F.cross_entropy(net(xa), yb, reduction="sum")
            gx, *gw = torch.autograd.grad(loss, [xa, *params], allow_unused=True)
            x_adv[start : start + batch_size] = ball.project(ball.step(xa.detach(), gx, attack["alpha"]), xb)
            for g, gb in zip(grads, gw):
                if gb is not None:  # a weight that does not reach the loss gets no step
                    g.add_(gb)
        with torch.no_grad():
            for p, w, v, g, r in zip(params, w0, nu, grads, radius):
                v.add_(g, alpha=weight_step * r / (float(g.norm()) + 1e-20))
                v.mul_(min(1.0, r / (float(v.norm()) + 1e-30)))
                p.copy_(w + v)
    with torch.no_grad():
        joint = sum(float(F.cross_entropy(net(x_adv[s : s + batch_size]), y[s : s + batch_size], reduction="sum"))
                    for s in range(0, n, batch_size)) / n
    rho_nu, acc_nu = robust_loss(net, x, y, attack=attack, batch_size=batch_size, seed=seed)
    return {
        "measure": "worst",
        "worst_flatness": rho_nu - rho_w,
        "robust_loss": rho_w,
        "robust_accuracy": acc_w,
        "perturbed_loss": rho_nu,
        "perturbed_accuracy": acc_nu,
        "joint_loss": joint,
        "relative_norms": [float(v.norm()) / (float(w.norm()) + 1e-30) for v, w in zip(nu, w0)],
        "xi": xi,
        "steps": steps,
        "weight_step": weight_step,
        "attack": attack,
        "n": int(n),
        "batch_size": batch_size,
        "seed": seed,
        "perturbed": [name for name, _ in named],
    }
