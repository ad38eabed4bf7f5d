"""Adversarial Weight Perturbation (Wu, Xia, Wang, NeurIPS 2020), as a SAM-like module.

One AT-AWP step in any training loop::

    x_adv = pgd(model, x, y, eps=8/255, alpha=2/255, steps=10)      # 1. attack at the unperturbed w
    awp.perturb(lambda m: F.cross_entropy(m(x_adv), y))               # 2.-3. w <- w + v
    loss = F.cross_entropy(model(x_adv), y)                           #       loss at w + v
    optimizer.zero_grad(); loss.backward(); optimizer.step()         #       step taken at w + v
    awp.restore()                                                     # 4. w <- w - v

v is the layer-wise relative ascent step of the paper (one step, on the ball):

    v_l = gamma * ||w_l|| * g_l / (||g_l|| + 1e-20),   g_l = d loss(w) / d w_l,   so ||v_l|| = gamma * ||w_l||.

This is exactly what the official code computes through a proxy model (load_state_dict, one SGD step,
rescale the difference), without the state_dict copy: the gradient is taken with
`torch.autograd.grad` (the model's `.grad` is untouched), BatchNorm running statistics are frozen
during the ascent pass (the proxy's statistics were thrown away), and norms, perturbation and restore
are single `torch._foreach_*` kernels over all perturbed tensors.

`perturb` never waits for the device (no host synchronization): whether the ascent gradient was finite is
kept on the device in `finite` (and per layer in `layer_finite`); a layer whose gradient is not finite gets
no perturbation (v_l = 0), so the weights stay finite and `restore` is exact. So does a layer whose
perturbation size gamma * ||w_l|| / ||g_l|| overflows (a huge gamma: `perturbation_finite`), and `finite` is
false then too. A training loop reads the flag when it reads its other metrics; `check()` reads it at once
and raises, naming the layer.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .modes import frozen_bn_stats, train_mode

EPS = 1e-20  # the official code's guard against a zero gradient


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel: the ascent pass runs on the wrapped module so DDP's reducer
    # does not wait for gradients that autograd.grad never accumulates; gradients are all-reduced below.
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def perturbed_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the weights AWP perturbs: every trainable parameter (requires_grad) with dim > 1, i.e. the
    conv and linear weights; biases, BatchNorm's affine parameters, frozen weights and buffers are left alone, as in
    the official code. The one definition of the set, shared by the landscape and the flatness measures."""
    return [(n, p) for n, p in _unwrap(model).named_parameters() if p.dim() > 1 and p.requires_grad]


class AWP:
    """Layer-wise relative adversarial weight perturbation.

    Args:
        model: the network being trained (a DDP-wrapped model works; see `perturb`).
        gamma: relative size of the perturbation, ||v_l|| = gamma * ||w_l|| (paper: 0.01 for AT,
            0.005 for TRADES). gamma = 0 makes `perturb`/`restore` exact no-ops.
        params: the tensors to perturb. Default: `perturbed_parameters(model)`, every trainable parameter with
            dim > 1 (conv and linear weights); biases and BatchNorm affine parameters are never perturbed by
            default, as in the paper.
        check_finite: keep the device-side flags `finite`/`layer_finite` and give a layer whose ascent
            gradient is not finite no perturbation (one elementwise pass over the gradients, no host
            synchronization). Off: no flags, and a non-finite gradient makes the weights non-finite.
    """

    def __init__(
        self,
        model: nn.Module,
        gamma: float = 0.01,
        params: Iterable[torch.Tensor] | None = None,
        check_finite: bool = True,
    ):
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"AWP gamma must be a finite number >= 0, got {gamma!r}")
        self.model = model
        self.gamma = float(gamma)
        self.check_finite = check_finite
        if params is None:
            chosen = perturbed_parameters(model)
        else:
            ids = {id(p) for p in params}
            chosen = [(n, p) for n, p in _unwrap(model).named_parameters() if id(p) in ids]
            if len(chosen) != len(ids):
                raise ValueError("AWP params= must be parameters of the model")
        if not chosen:
            raise ValueError("AWP found no parameter to perturb (it perturbs parameters with dim > 1)")
        self.names = [n for n, _ in chosen]
        self.params = [p for _, p in chosen]
        self._v: list[torch.Tensor] | None = None  # the perturbation in place, between perturb and restore
        self.layer_finite: torch.Tensor | None = None  # (L,) bool on the device: layer l's ascent gradient was finite
        # (L,) bool on the device: layer l's perturbation size gamma * ||w_l|| / ||g_l|| was finite (where its gradient was)
        self.perturbation_finite: torch.Tensor | None = None
        self.finite: torch.Tensor | None = None  # 0-dim bool on the device: all of both were (None: not checked)
        self.loss_finite: torch.Tensor | None = None  # 0-dim bool on the device: the ascent loss at w was finite
        self._loss: torch.Tensor | None = None  # the last ascent loss (detached), for check()'s message

    @property
    def active(self) -> bool:
        """True between `perturb` and `restore`."""
        return self._v is not None

    def perturb(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        """w <- w + v, v the normalized ascent step of `loss_fn(model)` (a scalar loss to ascend) at w.

        The loss is evaluated in train mode with BatchNorm running statistics frozen; the model's own
        mode, buffers and `.grad` are left as they were.
        """
        if self._v is not None:
            raise RuntimeError("AWP.perturb called twice without restore(): call awp.restore() after the optimizer step")
        self.layer_finite = self.perturbation_finite = self.finite = self.loss_finite = self._loss = None
        if self.gamma == 0:
            self._v = []  # exact no-op, but keep the perturb/restore pairing checked
            return
        net = _unwrap(self.model)
        with train_mode(net, True), frozen_bn_stats(net):
            loss = loss_fn(net)
            grads = list(torch.autograd.grad(loss, self.params, allow_unused=True))
        for i, g in enumerate(grads):
            if g is None:  # a weight that does not reach the loss gets no perturbation
                grads[i] = torch.zeros_like(self.params[i])
        self._all_reduce(grads)
        g_norm = torch.stack(torch._foreach_norm(grads))  # (L,)
        with torch.no_grad():
            w_norm = torch.stack(torch._foreach_norm(self.params))  # (L,)
            scale = self.gamma * w_norm / (g_norm + EPS)  # ||v_l|| = gamma * ||w_l||
            if self.check_finite:  # decided on the device: a layer with a non-finite gradient or size gets v_l = 0
                ok = torch.isfinite(g_norm)  # ||g_l|| is finite iff every entry of g_l is (or it overflowed)
                size_ok = torch.isfinite(scale) | ~ok  # gamma * ||w_l|| overflowed (a gradient's fault is told first)
                self.layer_finite, self.perturbation_finite, self.finite = ok, size_ok, (ok & size_ok).all()
                self._loss = loss.detach()
                self.loss_finite = torch.isfinite(self._loss)
                scale = torch.where(ok & size_ok, scale, 0)
                for g in grads:  # inf * 0 would be nan: zero the non-finite entries first
                    torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_mul_(grads, list(scale.to(grads[0].dtype).unbind()))
            torch._foreach_add_(self.params, grads)
        self._v = grads  # the only extra memory over AT: one tensor per perturbed weight

    def check(self) -> None:
        """Raise FloatingPointError naming the first layer whose last ascent gradient (or perturbation) was not finite.

        Reads the device-side flag (one host synchronization): call it where the loop reads its metrics,
        not after every step. No-op before the first `perturb` or with `check_finite=False`.
        """
        if self.layer_finite is None or bool(self.finite):
            return
        if not bool(self.layer_finite.all()):
            bad = self.names[int((~self.layer_finite).nonzero()[0])]
            raise FloatingPointError(f"AWP ascent gradient is not finite in layer {bad!r} (loss={float(self._loss):.4g})")
        bad = self.names[int((~self.perturbation_finite).nonzero()[0])]
        raise FloatingPointError(f"AWP perturbation is not finite in layer {bad!r}: gamma={self.gamma:g} times ||w|| "
                                 "overflows; lower gamma")

    def restore(self) -> None:
        """w <- w - v with exactly the v that `perturb` added (call it after optimizer.step())."""
        if self._v is None:
            raise RuntimeError("AWP.restore called without a matching perturb(): nothing to restore")
        if self._v:
            with torch.no_grad():
                torch._foreach_sub_(self.params, self._v)
        self._v = None

    @contextlib.contextmanager
    def perturbed(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> Iterator[None]:
        """`perturb(loss_fn)` on entry, `restore()` on exit, also when the block raises."""
        self.perturb(loss_fn)
        try:
            yield
        finally:
            self.restore()

    def perturbation(self) -> list[torch.Tensor]:
        """The tensors v currently added to the weights (empty when not active or gamma = 0)."""
        return list(self._v or [])

    @staticmethod
    def _all_reduce(grads: list[torch.Tensor]) -> None:
        # Under DDP every rank must add the same v, the ascent direction of the global batch.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(f)

    def state_dict(self) -> dict:
        """The configuration (the perturbation itself never outlives a step, so it is not saved)."""
        return {"gamma": self.gamma, "names": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("names") != self.names:
            raise ValueError("AWP state does not match this model's perturbed parameters")
        self.gamma = float(state["gamma"])
