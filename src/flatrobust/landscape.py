"""Weight loss landscape (AWP paper, Figure 1): the adversarial loss along random weight directions.

    g(alpha) = rho(w + alpha * d),   rho(w) = (1/n) sum_i max_{||x'_i - x_i|| <= eps} CE(f_w(x'_i), y_i)

d is a Gaussian direction normalized filter-wise (Li et al., "Visualizing the Loss Landscape of Neural
Nets", NeurIPS 2018): every filter d_{l,i} (slice i along dim 0 of a conv or linear weight) is rescaled
to ||w_{l,i}||; biases, BatchNorm parameters and frozen weights (every parameter AWP leaves alone,
`awp.perturbed_parameters`) get d = 0. The filter-wise
scale makes the curve invariant to the rescalings of ReLU networks that leave the function unchanged,
so landscapes of different models can be compared on one alpha axis.

rho is estimated with PGD re-run on every perturbed model (adversarial examples are REGENERATED for
w + alpha * d, not reused from w), in eval mode (BatchNorm uses the running statistics stored with w).
The PGD random start is drawn from a generator reseeded with the same seed for every perturbed model
(common random numbers): g(0) is exactly `robust_loss(model, x, y, attack=..., seed=seed)`, and
differences between alphas are not blurred by different random starts.

Nothing here changes the caller's model: every perturbation is applied to a private copy.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import AttackConfig, pgd
from .awp import perturbed_parameters
from .modes import train_mode
from .progress import Progress

__all__ = [
    "DEFAULT_ALPHAS",
    "check_attack",
    "filter_normalized_direction",
    "landscape_1d",
    "landscape_2d",
    "perturbed_parameters",
    "robust_loss",
]

DEFAULT_ALPHAS = tuple(round(-1 + 0.1 * i, 10) for i in range(21))  # -1.0, -0.9, ..., 1.0
DIRECTION = "filter-normalized Gaussian (Li et al. 2018); dim <= 1 parameters (biases, BatchNorm) zero"


def check_attack(attack: AttackConfig | dict[str, Any]) -> dict[str, Any]:
    """The threat model as a plain dict {norm, eps, alpha, steps}, validated by `attacks.AttackConfig` (ValueError;
    alpha defaults to `default_alpha(norm, eps)`, extra keys are dropped)."""
    return AttackConfig.of(attack).as_dict()


def _check_data(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"x (N, C, H, W) and y (N,) must hold the same N >= 1 examples, got {tuple(x.shape)} and {tuple(y.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random direction d, one tensor per `model.parameters()` entry (same shapes, devices, dtypes).

    For a weight w that AWP perturbs (`awp.perturbed_parameters`: trainable, dim > 1), d ~ N(0, I) and each filter
    is rescaled, d_i <- d_i * ||w_i|| / ||d_i|| with i indexing dim 0 (the output channel of a conv, the output
    unit of a linear layer), so ||d_i|| = ||w_i||. Every other parameter (biases, BatchNorm, frozen weights) gets
    d = 0.
    The Gaussian is drawn from `generator` on its own device (the global CPU RNG if None) and then moved
    to the parameter's device, so a CPU generator gives the same direction on any device.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perturbed = {id(p) for _, p in perturbed_parameters(model)}
    direction = []
    for w in model.parameters():
        if id(w) not in perturbed:
            direction.append(torch.zeros_like(w))
            continue
        d = torch.randn(w.shape, generator=generator, device=gen_device, dtype=w.dtype).to(w.device)
        w_norm = w.detach().flatten(1).norm(dim=1)  # (filters,)
        d_norm = d.flatten(1).norm(dim=1)
        d.mul_((w_norm / (d_norm + 1e-10)).view(-1, *([1] * (w.dim() - 1))))
        direction.append(d)
    return direction


def robust_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: AttackConfig | dict[str, Any],
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[float, float]:
    """rho(w) and the robust accuracy: mean CE and accuracy on PGD adversarial examples, in eval mode.

    PGD (CE loss, one restart, random start) with `attack` (an `AttackConfig` or a dict); the random start
    comes from a generator on x's device seeded with `seed`, so equal seeds give equal examples for equal
    weights. x (N, C, H, W) in [0, 1], y (N,); processed in batches of `batch_size`. The model's mode is
    restored afterwards; its weights and buffers are not changed.
    """
    attack = check_attack(attack)
    _check_data(x, y, batch_size)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total_loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with train_mode(model, False):
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            x_adv = pgd(model, xb, yb, eps=attack["eps"], alpha=attack["alpha"], steps=attack["steps"],
                        norm=attack["norm"], mode="eval", generator=generator)
            with torch.no_grad():
                logits = model(x_adv)
                total_loss += F.cross_entropy(logits, yb, reduction="sum").double()
                correct += (logits.argmax(1) == yb).sum()
    n = x.shape[0]
    return float(total_loss) / n, int(correct) / n  # one host synchronization per evaluation


def _check_alphas(alphas: Iterable[float], what: str = "alphas") -> list[float]:
    values = [float(a) for a in alphas]
    if not values or not all(math.isfinite(a) for a in values):
        raise ValueError(f"{what} must be a non-empty list of finite numbers, got {values!r}")
    return values


@torch.no_grad()
def _set_weights(params: Sequence[torch.Tensor], w0: Sequence[torch.Tensor], terms: Sequence[tuple[float, Sequence[torch.Tensor]]]) -> None:
    """params <- w0 + sum_k c_k * d_k, always from the saved w0 (no drift across alphas)."""
    for i, (p, w) in enumerate(zip(params, w0)):
        value = w.clone()
        for c, d in terms:
            if c != 0:
                value.add_(d[i], alpha=c)
        p.copy_(value)


def _settings(x, attack, batch_size, seed, model) -> dict[str, Any]:
    return {"attack": attack, "n": int(x.shape[0]), "batch_size": batch_size, "seed": seed, "direction": DIRECTION,
            "mode": "eval (BatchNorm running statistics of w)",
            "perturbed": [n for n, _ in perturbed_parameters(model)]}


def landscape_1d(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: AttackConfig | dict[str, Any],
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    directions: int = 3,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """g_k(alpha) = rho(w + alpha * d_k) for `directions` filter-normalized directions d_k.

    Args:
        model: maps images in [0, 1] to logits; left bit-identical (a copy is perturbed).
        x, y: evaluation examples (N, C, H, W) in [0, 1] and labels (N,).
        attack: the PGD that estimates rho (re-run for every perturbed model): an `AttackConfig` or a dict
            {norm, eps, alpha, steps}.
        alphas: step sizes along each direction, in units of the filter-normalized direction
            (alpha = 1 moves every filter by its own norm). Default -1, -0.9, ..., 1.
        directions: number K of random directions (drawn one after the other from
            `torch.Generator().manual_seed(seed)`).
        batch_size: examples per PGD batch.
        seed: directions and PGD random starts (the PGD generator is reseeded with `seed` for every model).
        progress: report progress over the perturbed models on stderr (`flatrobust.progress`: a bar on a
            terminal, a heartbeat line every 30 s otherwise).

    Returns a JSON-ready dict: "alphas"; "losses" and "accuracies", K lists of len(alphas) (robust CE loss
    in nats, robust accuracy as a fraction); "mean_loss", "mean_accuracy" over directions; "loss_at_w"
    and "accuracy_at_w" (rho(w), alpha = 0); and the settings ("attack", "n", "seed", "directions", ...).
    alpha = 0 is the same model for every direction and is evaluated once.
    """
    attack = check_attack(attack)
    alphas = _check_alphas(alphas)
    _check_data(x, y, batch_size)
    if not isinstance(directions, int) or directions < 1:
        raise ValueError(f"directions must be an integer >= 1, got {directions!r}")
    net = copy.deepcopy(model).eval()
    params = list(net.parameters())
    w0 = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(seed)
    dirs = [filter_normalized_direction(net, generator) for _ in range(directions)]

    nonzero = [a for a in alphas if a != 0]
    with Progress(total=1 + directions * len(nonzero), desc="landscape 1-D", unit="model", enabled=progress) as bar:
        loss_w, acc_w = robust_loss(net, x, y, attack=attack, batch_size=batch_size, seed=seed)  # g(0) = rho(w)
        bar.update()
        losses, accuracies = [], []
        for d in dirs:
            row_loss, row_acc = [], []
            for a in alphas:
                if a == 0:
                    loss, acc = loss_w, acc_w
                else:
                    _set_weights(params, w0, [(a, d)])
                    loss, acc = robust_loss(net, x, y, attack=attack, batch_size=batch_size, seed=seed)
                    bar.update()
                row_loss.append(loss)
                row_acc.append(acc)
            losses.append(row_loss)
            accuracies.append(row_acc)
    return {
        "kind": "1d",
        "alphas": alphas,
        "directions": directions,
        "losses": losses,
        "accuracies": accuracies,
        "mean_loss": [sum(col) / directions for col in zip(*losses)],
        "mean_accuracy": [sum(col) / directions for col in zip(*accuracies)],
        "loss_at_w": loss_w,
        "accuracy_at_w": acc_w,
        **_settings(x, attack, batch_size, seed, net),
    }


def landscape_2d(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: AttackConfig | dict[str, Any],
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    betas: Iterable[float] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """g(alpha, beta) = rho(w + alpha * d_1 + beta * d_2) on the grid alphas x betas.

    d_1, d_2: the first two filter-normalized directions drawn from `torch.Generator().manual_seed(seed)`
    (nearly orthogonal in high dimension, as in Li et al. 2018). betas default to alphas. Costs
    len(alphas) * len(betas) PGD evaluations. Same conventions as `landscape_1d`; returns "alphas",
    "betas", "loss" and "accuracy" as len(alphas) lists of len(betas), "loss_at_w", and the settings.
    """
    attack = check_attack(attack)
    alphas = _check_alphas(alphas)
    betas = alphas if betas is None else _check_alphas(betas, "betas")
    _check_data(x, y, batch_size)
    net = copy.deepcopy(model).eval()
    params = list(net.parameters())
    w0 = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(net, generator)
    d2 = filter_normalized_direction(net, generator)

    with Progress(total=len(alphas) * len(betas), desc="landscape 2-D", unit="model", enabled=progress) as bar:
        loss_w = acc_w = None
        loss, accuracy = [], []
        for a in alphas:
            row_loss, row_acc = [], []
            for b in betas:
                _set_weights(params, w0, [(a, d1), (b, d2)])
                lo, ac = robust_loss(net, x, y, attack=attack, batch_size=batch_size, seed=seed)
                bar.update()
                if a == 0 and b == 0:
                    loss_w, acc_w = lo, ac
                row_loss.append(lo)
                row_acc.append(ac)
            loss.append(row_loss)
            accuracy.append(row_acc)
    if loss_w is None:  # the grid misses (0, 0): evaluate w itself for reference
        _set_weights(params, w0, [])
        loss_w, acc_w = robust_loss(net, x, y, attack=attack, batch_size=batch_size, seed=seed)
    return {
        "kind": "2d",
        "alphas": alphas,
        "betas": betas,
        "loss": loss,
        "accuracy": accuracy,
        "loss_at_w": loss_w,
        "accuracy_at_w": acc_w,
        **_settings(x, attack, batch_size, seed, net),
    }
