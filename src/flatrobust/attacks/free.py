"""Free adversarial training's perturbation (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019, Algorithm 1).

Free AT replays every minibatch m times. One perturbation delta, the shape of a batch and zero at the start of
training, persists across the replays and from one batch to the next. Each replay is one forward/backward pass on
x + delta that gives both the weight gradient (the optimizer steps with it) and the input gradient g, and then

    delta <- P(x + delta + alpha * step(g)) - x

with `step` the threat model's steepest-ascent direction (L-inf: sign(g), the paper's update with alpha = eps; L2:
g / ||g||, as this project's PGD steps) and P the projection onto the eps ball around x intersected with [0, 1]
(Shafahi et al.'s code clips delta to [-eps, eps] and only the input to the image range). The carried delta is
therefore the perturbation actually applied to its batch; on the next batch it is projected again around the new images.

A batch of a different size uses the first rows of delta and leaves the others as they were (as Shafahi et al.'s
code slices its global perturbation); a larger batch gets new rows from the start, and a batch of another image shape
starts a new delta. The start is zero, or for TRADES' KL loss 0.001 * N(0, 1) (TRADES' own start: the KL's gradient
vanishes at delta = 0, so a zero delta would never move).

The perturbation is state of the run: `state_dict` / `load_state_dict` carry it through checkpoints for an exact
resume. This module computes no gradient itself: the training step (`train.train_step`) takes the input gradient
from its own backward pass and hands it to `update`.
"""
from __future__ import annotations

import torch

from .threat import threat_model

STARTS = ("zero", "kl")  # where a new delta starts: zero (the paper), or TRADES' 0.001 * N(0, 1) for the KL loss


class FreePerturbation:
    """The persistent delta of Free AT in the `norm` ball of radius `eps`, moved by `alpha` per replay (the paper: eps)."""

    def __init__(self, eps: float, alpha: float, norm: str = "linf"):
        self.ball = threat_model(norm, eps)
        self.alpha = float(alpha)
        self.delta: torch.Tensor | None = None  # (B, C, H, W), B the largest batch seen

    def apply(self, x: torch.Tensor, start: str = "zero", generator: torch.Generator | None = None) -> torch.Tensor:
        """x + delta projected onto the ball around x and [0, 1] (detached): this replay's adversarial batch."""
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
        x = x.detach()
        d = self.delta
        if d is not None and (d.device != x.device or d.dtype != x.dtype):  # (a checkpoint's, loaded elsewhere)
            d = d.to(x.device, x.dtype)
        if d is None or d.shape[1:] != x.shape[1:]:
            d = self._start(x, start, generator)
        elif len(d) < len(x):
            d = torch.cat([d, self._start(x[len(d):], start, generator)])
        self.delta = d
        return self.ball.project(x + d[:len(x)], x)

    def update(self, x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """One ascent step of delta's rows of this batch from `grad`, the training loss's gradient at `x_adv`. Non-finite
        entries of `grad` count as zero, so delta stays finite; `keep` (a 0-dim bool on the device, e.g. a step that
        nonfinite=skip undoes) leaves delta as it was, without a host synchronization."""
        with torch.no_grad():
            grad = torch.where(torch.isfinite(grad), grad, 0.0)
            new = self.ball.project(self.ball.step(x_adv.detach(), grad, self.alpha), x.detach()) - x
            self.delta[:len(x)] = new if keep is None else torch.where(keep, self.delta[:len(x)], new)

    def _start(self, x: torch.Tensor, start: str, generator: torch.Generator | None) -> torch.Tensor:
        if start == "zero":
            return torch.zeros_like(x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.ball.project(x + 0.001 * noise, x) - x

    def state_dict(self) -> dict:
        return {"delta": self.delta}

    def load_state_dict(self, state: dict | None) -> None:
        self.delta = (state or {}).get("delta")
