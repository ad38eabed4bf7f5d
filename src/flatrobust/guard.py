"""The training guard on the device: non-finite steps flagged, counted and (optionally) undone without
the host ever waiting for the device inside a step.

Asking "is this loss finite?" after every step costs a host synchronization per step, and on a GPU each
one drains the queue of small kernels. Instead every step leaves its answer on the device (`finite`, a
0-dim bool), and the loop reads it, together with its running metrics, at a logging interval:

- `StepMonitor` keeps the sums of one stretch of steps on the device (loss x examples, correct, seen) and
  the record of the first non-finite step in it (its index, whether AWP's ascent gradient or the loss was
  the cause, the layer, the loss); `read()` brings everything to the host in one transfer.
- `Rollback` (for `nonfinite=skip`) makes a step a no-op when its flag is false: before the step it copies
  the weights, buffers and optimizer state into buffers it keeps, after the step it puts them back with
  `torch.where(finite, new, saved)`, all on the device. Its cost: one more copy of those tensors in memory
  and two elementwise passes over them per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StretchReport:
    """What `StepMonitor.read` found on the host, for the steps since the previous read."""

    loss_sum: float  # sum over finite steps of loss x batch size
    correct: float  # adversarial examples classified correctly (finite steps)
    seen: int  # examples in finite steps
    bad: int  # non-finite steps
    first_bad: int  # index (the loop's batch index) of the first non-finite step; -1 when none
    first_bad_awp: bool  # that step's AWP ascent gradient was non-finite (else its loss was)
    first_bad_layer: int  # the first AWP layer whose gradient was non-finite, in that step
    first_bad_loss: float  # that step's training loss

    def describe(self, awp_names: list[str] | None) -> str:
        """The cause of the first non-finite step, as the message of a FloatingPointError would say it."""
        if self.first_bad_awp and awp_names:
            return f"AWP ascent gradient is not finite in layer {awp_names[self.first_bad_layer]!r}"
        return f"training loss is {self.first_bad_loss}"


class StepMonitor:
    """On-device sums of the steps since the last `read`, and the first non-finite step among them."""

    def __init__(self, device: torch.device):
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x n, correct, seen
        self._bad = torch.zeros((), dtype=torch.int64, device=device)
        self._first = torch.full((4,), -1.0, dtype=torch.float64, device=device)  # step, awp?, layer, loss
        self._step = torch.zeros((), dtype=torch.int64, device=device)

    def start(self, step: int) -> None:
        """The next step added has index `step` (e.g. its batch index in the epoch); sums start at zero."""
        self._step.fill_(step)
        self._reset()

    def _reset(self) -> None:
        self._sums.zero_()
        self._bad.zero_()
        self._first.fill_(-1.0)

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int, finite: torch.Tensor,
            awp_layer_finite: torch.Tensor | None = None) -> None:
        """Account one step of `n` examples; device ops only (no host synchronization)."""
        vals = torch.stack([loss.detach().double() * n, correct.double(), loss.new_full((), n, dtype=torch.float64)])
        self._sums += torch.where(finite, vals, 0.0)  # a non-finite step adds nothing (0 * nan would be nan)
        bad = ~finite
        first = bad & (self._bad == 0)
        if awp_layer_finite is not None:
            layer_bad = ~awp_layer_finite
            awp_bad, layer = layer_bad.any().double(), layer_bad.double().argmax().double()
        else:
            awp_bad = layer = loss.new_zeros((), dtype=torch.float64)
        record = torch.stack([self._step.double(), awp_bad, layer, loss.detach().double()])
        self._first = torch.where(first, record, self._first)
        self._bad += bad
        self._step += 1

    def read(self) -> StretchReport:
        """Everything since the last read, in one device-to-host transfer; then start a new stretch."""
        loss_sum, correct, seen, bad, step, awp_bad, layer, bad_loss = torch.cat(
            [self._sums, self._bad.double()[None], self._first]).tolist()
        self._reset()
        return StretchReport(loss_sum, correct, int(seen), int(bad), int(step), awp_bad > 0, int(layer), bad_loss)


class Rollback:
    """Undo a step on the device when its `finite` flag is false (`nonfinite=skip` without host syncs).

    Covers every parameter and buffer of `model` and every tensor in the optimizer's state. State that a
    step creates (SGD's momentum buffer on the first step) is set to zero when that step is undone: for
    SGD (dampening 0) a zero buffer and no buffer give the same next step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self._tensors: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def _current(self) -> list[torch.Tensor]:
        out, seen = [], set()
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        for t in [*self.model.parameters(), *self.model.buffers(), *state]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def save(self) -> None:
        """Copy what the next step may change (into buffers kept between steps)."""
        tensors = self._current()
        if [id(t) for t in tensors] != [id(t) for t in self._tensors]:  # first step, or new optimizer state
            self._tensors, self._saved = tensors, [torch.empty_like(t) for t in tensors]
        with torch.no_grad():
            torch._foreach_copy_(self._saved, self._tensors)

    def apply(self, finite: torch.Tensor) -> None:
        """Keep the step if `finite`, else put back what `save` copied (and zero state the step created)."""
        known = {id(t) for t in self._tensors}
        with torch.no_grad():
            for t, saved in zip(self._tensors, self._saved):
                torch.where(finite, t, saved, out=t)
            for t in self._current():
                if id(t) not in known:
                    torch.where(finite, t, t.new_zeros(()), out=t)
