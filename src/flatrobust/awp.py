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

Fine-tuning AWP (docs/AWP_VARIANTS.md), the variant copied from fine-tuning code rather than the paper, is the
same object with options, each off by default so that the paper's update is unchanged: `patterns` (perturb only
the parameters whose name matches, e.g. the word embeddings, whatever their dim), `ascent_steps` (K ascent steps,
each of size gamma * ||w_l + v_l|| from the gradient at w + v), `eps_rel` (every element bounded,
|v_ij| <= eps_rel * |w_ij|), `start_step` / `start_epoch` (plain steps before them) and `scaler` (a
`torch.amp.GradScaler`: the ascent loss is scaled, the gradients unscaled before the norms). Its ascent from
the clean loss is `perturb(lambda m: loss(m(x), y))` on the clean batch.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .modes import frozen_bn_stats, train_mode

EPS = 1e-20  # the official code's guard against a zero gradient


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel: the ascent pass runs on the wrapped module so DDP's reducer
    # does not wait for gradients that autograd.grad never accumulates; gradients are all-reduced below.
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def perturbed_parameters(model: nn.Module, patterns: str | Sequence[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """The weights AWP perturbs, as (name, parameter) of the model without its DDP wrapper.

    `patterns` None (the paper): every trainable parameter with dim > 1 (conv and linear weights, embeddings);
    biases and normalization parameters are left alone. Otherwise one regular expression or several, searched
    in each name (`re.search`, so the plain word "weight" matches every name that contains it, as the
    fine-tuning snippet's `adv_param in name` does): every trainable parameter that one of them matches,
    whatever its dim. ValueError when a pattern is not a regular expression or matches no trainable parameter.
    """
    named = [(n, p) for n, p in _unwrap(model).named_parameters() if p.requires_grad]
    if patterns is None:
        chosen = [(n, p) for n, p in named if p.dim() > 1]
        if not chosen:
            raise ValueError("AWP found no parameter to perturb (it perturbs parameters with dim > 1)")
        return chosen
    regexes = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        try:
            rx = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"AWP patterns: {pattern!r} is not a regular expression ({e})") from None
        if not any(rx.search(n) for n, _ in named):
            shown = ", ".join(repr(n) for n, _ in named[:3])
            raise ValueError(f"AWP pattern {pattern!r} matches no trainable parameter of the model (names such as {shown})")
        regexes.append(rx)
    if not regexes:
        raise ValueError("AWP patterns is empty: give at least one pattern, or None for every weight of dim > 1")
    return [(n, p) for n, p in named if any(rx.search(n) for rx in regexes)]


class AWP:
    """Layer-wise relative adversarial weight perturbation.

    Args:
        model: the network being trained (a DDP-wrapped model works; see `perturb`).
        gamma: relative size of the perturbation, ||v_l|| = gamma * ||w_l|| (paper: 0.01 for AT,
            0.005 for TRADES). gamma = 0 makes `perturb`/`restore` exact no-ops.
        params: the tensors to perturb. Default: every parameter with dim > 1 (conv and linear weights);
            biases and BatchNorm affine parameters are never perturbed by default, as in the paper.
        check_finite: keep the device-side flags `finite`/`layer_finite` and give a layer whose ascent
            gradient is not finite no perturbation (one elementwise pass over the gradients, no host
            synchronization). Off: no flags, and a non-finite gradient makes the weights non-finite.

    Fine-tuning options (docs/AWP_VARIANTS.md), keyword-only, each off by default:
        patterns: perturb the trainable parameters whose name one of these regular expressions matches
            (`perturbed_parameters`), e.g. "word_embeddings"; instead of `params`.
        ascent_steps: K >= 1 ascent steps, v <- v + gamma * ||w_l + v_l|| * g_l / (||g_l|| + 1e-20) with g the
            gradient at w + v (K forward/backward passes). No projection onto the ball: without `eps_rel`,
            ||v_l|| grows up to K * gamma * ||w_l||, as in the snippet.
        eps_rel: > 0 bounds every element after every ascent step, |v_ij| <= eps_rel * |w_ij| (w at `perturb`).
        start_step, start_epoch: `perturb` is an exact no-op while `step` < start_step or `epoch` <
            start_epoch. `step` counts `perturb` calls (a loop or trainer may set it, e.g. to its global step
            on resume); `epoch` is set by the loop, `awp.epoch = epoch`, as DistributedSampler.set_epoch.
        scaler: a `torch.amp.GradScaler`: the ascent loss is scaled before its backward (fp16 gradients do
            not underflow) and the gradients unscaled before the norms; an ascent gradient that overflowed
            leaves its layer unperturbed and clears `finite`, as a non-finite gradient does without one.
    """

    def __init__(
        self,
        model: nn.Module,
        gamma: float = 0.01,
        params: Iterable[torch.Tensor] | None = None,
        check_finite: bool = True,
        *,
        patterns: str | Sequence[str] | None = None,
        ascent_steps: int = 1,
        eps_rel: float | None = None,
        start_step: int = 0,
        start_epoch: int = 0,
        scaler: Any = None,
    ):
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"AWP gamma must be a finite number >= 0, got {gamma!r}")
        if not isinstance(ascent_steps, int) or isinstance(ascent_steps, bool) or ascent_steps < 1:
            raise ValueError(f"AWP ascent_steps must be an integer >= 1, got {ascent_steps!r}")
        if eps_rel is not None and (not isinstance(eps_rel, (int, float)) or not math.isfinite(eps_rel) or eps_rel <= 0):
            raise ValueError(f"AWP eps_rel must be a finite number > 0 (|v_ij| <= eps_rel * |w_ij|; None: no bound; "
                             f"gamma=0 turns AWP off), got {eps_rel!r}")
        for key, value in (("start_step", start_step), ("start_epoch", start_epoch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AWP {key} must be an integer >= 0, got {value!r}")
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise ValueError(f"AWP scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if params is not None and patterns is not None:
            raise ValueError("AWP takes params= or patterns=, not both")
        self.model = model
        self.gamma = float(gamma)
        self.check_finite = check_finite
        self.ascent_steps, self.eps_rel, self.scaler = ascent_steps, None if eps_rel is None else float(eps_rel), scaler
        self.start_step, self.start_epoch = start_step, start_epoch
        self.step = 0  # perturb calls so far (a no-op call counts): start_step compares with it
        self.epoch = 0  # set by the training loop: start_epoch compares with it
        if params is None:
            chosen = perturbed_parameters(model, patterns)
        else:
            ids = {id(p) for p in params}
            chosen = [(n, p) for n, p in _unwrap(model).named_parameters() if id(p) in ids]
            if len(chosen) != len(ids):
                raise ValueError("AWP params= must be parameters of the model")
            if not chosen:
                raise ValueError("AWP found no parameter to perturb (params= is empty)")
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

    @property
    def started(self) -> bool:
        """Whether the next `perturb` perturbs: `step` >= start_step and `epoch` >= start_epoch (and gamma > 0)."""
        return self.gamma > 0 and self.step >= self.start_step and self.epoch >= self.start_epoch

    def perturb(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        """w <- w + v, v the normalized ascent step of `loss_fn(model)` (a scalar loss to ascend) at w.

        The loss is evaluated in train mode with BatchNorm running statistics frozen; the model's own
        mode, buffers and `.grad` are left as they were. Before `start_step`/`start_epoch` (and with
        gamma = 0) it is an exact no-op that `loss_fn` is not called for.
        """
        if self._v is not None:
            raise RuntimeError("AWP.perturb called twice without restore(): call awp.restore() after the optimizer step")
        self.layer_finite = self.perturbation_finite = self.finite = self.loss_finite = self._loss = None
        started = self.started
        self.step += 1
        if not started:
            self._v = []  # exact no-op, but keep the perturb/restore pairing checked
            return
        net = _unwrap(self.model)
        if self.ascent_steps == 1 and self.eps_rel is None:  # the paper: one step, onto the sphere
            grads = self._ascent_step(net, loss_fn)
            with torch.no_grad():
                torch._foreach_add_(self.params, grads)
            self._v = grads  # the only extra memory over AT: one tensor per perturbed weight
            return
        self._v = self._fine_tuning_ascent(net, loss_fn)

    def _ascent_step(self, net: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> list[torch.Tensor]:
        """gamma * ||w_l|| * g_l / (||g_l|| + 1e-20) at the current weights w (0 where g_l is not finite)."""
        with train_mode(net, True), frozen_bn_stats(net):
            loss = loss_fn(net)
            scaled = loss if self.scaler is None else self.scaler.scale(loss)  # fp16: small gradients survive
            grads = list(torch.autograd.grad(scaled, self.params, allow_unused=True))
        for i, g in enumerate(grads):
            if g is None:  # a weight that does not reach the loss gets no perturbation
                grads[i] = torch.zeros_like(self.params[i])
        if self.scaler is not None:  # unscale before the norms (1 / s on the device: no host synchronization)
            inv_scale = 1.0 / self.scaler.scale(torch.ones((), device=grads[0].device, dtype=torch.float32))
            torch._foreach_mul_(grads, inv_scale)
        self._all_reduce(grads)
        g_norm = torch.stack(torch._foreach_norm(grads))  # (L,)
        with torch.no_grad():
            w_norm = torch.stack(torch._foreach_norm(self.params))  # (L,)
            scale = self.gamma * w_norm / (g_norm + EPS)  # ||v_l|| = gamma * ||w_l||
            if self.check_finite:  # decided on the device: a layer with a non-finite gradient or size gets v_l = 0
                ok = torch.isfinite(g_norm)  # ||g_l|| is finite iff every entry of g_l is (or it overflowed)
                size_ok = torch.isfinite(scale) | ~ok  # gamma * ||w_l|| overflowed (a gradient's fault is told first)
                if self.layer_finite is None:  # the first ascent step, at w
                    self.layer_finite, self.perturbation_finite = ok, size_ok
                    self.loss_finite = torch.isfinite(loss.detach())
                else:  # a later one (ascent_steps > 1): any step's fault counts
                    self.layer_finite, self.perturbation_finite = self.layer_finite & ok, self.perturbation_finite & size_ok
                self.finite = (self.layer_finite & self.perturbation_finite).all()
                self._loss = loss.detach()
                scale = torch.where(ok & size_ok, scale, 0)
                for g in grads:  # inf * 0 would be nan: zero the non-finite entries first
                    torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_mul_(grads, list(scale.to(grads[0].dtype).unbind()))
        return grads

    def _fine_tuning_ascent(self, net: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> list[torch.Tensor]:
        """K ascent steps from the gradient at w + v, each v clipped to |v_ij| <= eps_rel * |w_ij|; returns v
        (the weights hold w + v). If `loss_fn` raises, the weights are given back as they were."""
        bound = None
        if self.eps_rel is not None:
            with torch.no_grad():
                bound = torch._foreach_abs(self.params)  # |w_ij| at the start of the step: the snippet's backup
                torch._foreach_mul_(bound, self.eps_rel)
                lower = torch._foreach_neg(bound)
        v = [torch.zeros_like(p) for p in self.params]
        try:
            for _ in range(self.ascent_steps):
                step = self._ascent_step(net, loss_fn)  # at w + v
                with torch.no_grad():
                    new = torch._foreach_add(v, step)
                    if bound is not None:  # |v_ij| <= eps_rel * |w_ij|, elementwise
                        torch._foreach_minimum_(new, bound)
                        torch._foreach_maximum_(new, lower)
                    torch._foreach_add_(self.params, torch._foreach_sub(new, v))  # w + v -> w + new
                    v = new
        except BaseException:
            with torch.no_grad():
                torch._foreach_sub_(self.params, v)
            raise
        return v

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
        """The configuration and the step/epoch counters (the perturbation itself never outlives a step, so it
        is not saved)."""
        return {"gamma": self.gamma, "names": list(self.names), "step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("names") != self.names:
            raise ValueError("AWP state does not match this model's perturbed parameters")
        self.gamma = float(state["gamma"])
        self.step, self.epoch = int(state.get("step", 0)), int(state.get("epoch", 0))
