"""Threat models as tiny geometry objects: random start, ascent step, projection.

With the geometry factored out, PGD for every norm and every loss is one loop (attacks/pgd.py).
All tensors are images (B, C, H, W) in [0, 1]; eps and step sizes are in the same pixel units.
"""
from __future__ import annotations

import math

import torch


def format_eps(eps: float) -> str:
    """eps as a recipe writes it: a short decimal as such ("0.2", not 51/255), a fraction of 255 as one
    ("8/255", not 0.03137), anything else with 4 significant digits."""
    if not isinstance(eps, (int, float)) or not math.isfinite(eps):
        return "?"
    short = f"{eps:.4g}"
    if float(short) == eps:
        return short
    k = round(eps * 255)
    if k > 0 and math.isclose(eps, k / 255, rel_tol=1e-9, abs_tol=0):
        return f"{k}/255"
    return short


def whole_box_warning(norm: str, eps: float, image_numel: int) -> str | None:
    """One line when the eps-ball around every image contains the whole image box [0, 1]^d (L-inf: eps >= 1;
    L2: eps >= sqrt(d), the box's diagonal): then any image can be turned into any other, robust accuracy is
    0 by construction and training against such an attack teaches nothing about robustness."""
    reach = 1.0 if norm == "linf" else math.sqrt(image_numel)
    if not eps >= reach:
        return None
    return (f"eps={format_eps(eps) if eps < 1e6 else f'{eps:.3g}'} ({norm}) covers the whole input range (inputs lie in [0, 1]; "
            f"eps >= {reach:.4g} reaches every image from every other), so no model can be robust at it: eps is in pixel "
            "units, e.g. 8/255 for CIFAR under L-inf")


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped (B, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class LinfBall:
    """{x' : ||x' - x||_inf <= eps} intersected with the image box [0, 1]."""

    name = "linf"

    def __init__(self, eps: float):
        self.eps = eps

    def random_init(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + (2 * noise - 1) * self.eps).clamp_(0, 1)  # uniform in the cube

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        return x_adv + alpha * grad.sign()  # steepest ascent for the L-inf norm

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp_(0, 1)

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).abs().amax(dim=1)  # (B,)


class L2Ball:
    """{x' : ||x' - x||_2 <= eps} (per example, over all pixels) intersected with [0, 1]."""

    name = "l2"

    def __init__(self, eps: float):
        self.eps = eps

    def random_init(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # Uniform direction, radius eps * U(0, 1) (as in Rice et al.'s L2 PGD), then projected.
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        d = d / (_per_example_norm(d) + 1e-12) * r * self.eps
        return self.project(x + d, x)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        return x_adv + alpha * grad / (_per_example_norm(grad) + 1e-12)  # steepest ascent for L2

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = x_adv - x
        factor = (self.eps / (_per_example_norm(delta) + 1e-12)).clamp(max=1.0)
        return (x + delta * factor).clamp_(0, 1)

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).norm(dim=1)  # (B,)


THREAT_MODELS = {"linf": LinfBall, "l2": L2Ball}


def threat_model(norm: str, eps: float):
    """`LinfBall(eps)` or `L2Ball(eps)`; ValueError for an unknown norm or a bad eps."""
    if norm not in THREAT_MODELS:
        raise ValueError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return THREAT_MODELS[norm](float(eps))


def default_alpha(norm: str, eps: float) -> float:
    """PGD step size: the paper's steps scaled with eps, eps/4 for L-inf (2/255 at 8/255) and eps * 15/128
    for L2 (15/255 at 128/255), the step sizes of AWP's official training and evaluation code."""
    return eps / 4 if norm == "linf" else eps * 15 / 128
