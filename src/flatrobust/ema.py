"""Exponential moving average (EMA) of a model's weights, as evaluated by RobustBench's top entries.

    ema = EMA(model, decay=0.999)       # a copy of model: ema.module
    for x, y in loader:
        ...one training step (with AWP: after awp.restore())...
        ema.update(model)               # after every optimizer step
    evaluate(ema.module, ...)

`update(model)` after the t-th call before it (t = 0, 1, ...) does, for every floating-point parameter,

    d_t = min(decay, (1 + t) / (10 + t))     # warm-up: 0.1, 0.18, 0.25, ... reaching `decay` later
    ema <- d_t * ema + (1 - d_t) * w

so the average forgets its (random) starting point within the first steps instead of over 1 / (1 - decay)
of them (`warmup=False`: d_t = decay). The buffers (BatchNorm running mean / variance and their counter)
are copied from the model, not averaged: the choice of the weight-averaging code behind the top
RobustBench CIFAR-10 entries (Rebuffi et al. 2021, Wang et al. 2023). A running mean is itself already an
average over recent batches, and a second average of it would lag the weights it normalizes.

Call `update` with the weights the model really has: in an AWP step that is after `restore()`, never
at w + v (the loop of `flatrobust train` does so; tests check that AWP never leaks into the average).
It runs on the device with `torch._foreach_*` kernels and reads nothing back to the host.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """An exponential moving average of `model`'s parameters, kept in `self.module` (a copy of `model`).

    Args:
        model: the network being trained (its current weights start the average).
        decay: the long-run decay in [0, 1); 0 makes the average the last weights.
        warmup: use min(decay, (1 + t) / (10 + t)) at update t (default), else `decay` from the start.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None
        self._pairs: tuple[int, list, list, list, list] | None = None  # (id(model), own params, its params, own buffers, its buffers)

    def decay_at(self, t: int) -> float:
        """The decay used by update number t (0-based)."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- d_t * ema + (1 - d_t) * w for the parameters; buffers copied from `model`."""
        if self._pairs is None or self._pairs[0] != id(model):
            own_p, own_b = dict(self.module.named_parameters()), dict(self.module.named_buffers())
            new_p, new_b = dict(model.named_parameters()), dict(model.named_buffers())
            if own_p.keys() != new_p.keys() or own_b.keys() != new_b.keys():
                raise ValueError("EMA.update: the model's parameters and buffers are not those the EMA was made from")
            floats = [k for k, v in own_p.items() if v.is_floating_point()]
            self._pairs = (id(model), [own_p[k] for k in floats], [new_p[k] for k in floats],
                           list(own_b.values()), [new_b[k] for k in own_b])
        _, own_p, new_p, own_b, new_b = self._pairs
        if own_p:
            torch._foreach_lerp_(own_p, new_p, 1.0 - self.decay_at(self.num_updates))
        if own_b:
            torch._foreach_copy_(own_b, new_b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only: loads with torch.load(weights_only=True)."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.warmup, self.num_updates = float(state["decay"]), bool(state["warmup"]), int(state["num_updates"])
        self.module.load_state_dict(state["model"])
