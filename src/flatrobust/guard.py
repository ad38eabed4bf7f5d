"""The training guard on the device: non-finite steps flagged, counted and (optionally) undone without
the host ever waiting for the device inside a step.

Asking "is this loss finite?" after every step costs a host synchronization per step, and on a GPU each
one drains the queue of small kernels. Instead every step leaves its answer on the device (`finite`, a
0-dim bool), and the loop reads it, together with its running metrics, at a logging interval:

- `StepMonitor` keeps the sums of one stretch of steps on the device (loss x examples, correct, seen), the
  record of the first non-finite step in it (its index, what went non-finite, the layer, the loss) and the
  longest run of consecutive non-finite steps; `read()` brings everything to the host in one transfer.
- `Rollback` (for `nonfinite=skip`) makes a step a no-op when its flag is false: before the step it copies
  the weights, buffers and optimizer state into buffers it keeps, after the step it puts them back with
  `torch.where(finite, new, saved)`, all on the device. Its cost: one more copy of those tensors in memory
  and two elementwise passes over them per step.
- `skip_failure` and `stop_message`: when skipping has become the whole of training (`nonfinite=skip` with
  every step of an epoch, or MAX_SKIPPED_RUN steps in a row, skipped: the weights no longer change, so
  nothing will), and what a stop says: the step, what went non-finite, the hyper-parameter to blame for it
  (`StretchReport.blame`) and the checkpoint that is really on disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# What went non-finite in a step, in the order a step meets them (the code StepMonitor keeps on the device):
LOSS, AWP_GRADIENT, AWP_SIZE, AWP_LOSS, AWP_AT_W = range(5)
# LOSS: the training loss, AWP off. AWP_AT_W: AWP on, the loss at w itself non-finite. AWP_GRADIENT: AWP's
# ascent gradient at w. In these three the weights w have diverged: the updates were too large (optim.lr; with
# AWP on, each update was taken at w + v, so a large awp.gamma can be the cause too). AWP_SIZE: AWP's
# perturbation size gamma * ||w_l|| / ||g_l|| overflowed. AWP_LOSS: the loss at w + v is non-finite while the
# loss at w was finite: the perturbation made it so. These two are awp.gamma's.

# nonfinite=skip undoes a bad step, so the next step starts from the same weights: a run of this many skipped
# steps in a row (or a whole epoch, if shorter) means those weights give non-finite values on every batch,
# and skipping will not change that. A spike from an unlucky batch or attack start is one or two steps.
MAX_SKIPPED_RUN = 20


@dataclass
class StretchReport:
    """What `StepMonitor.read` found on the host, for the steps since the previous read."""

    loss_sum: float  # sum over finite steps of loss x batch size
    correct: float  # adversarial examples classified correctly (finite steps)
    seen: int  # examples in finite steps
    bad: int  # non-finite steps
    first_bad: int  # index (the loop's batch index) of the first non-finite step; -1 when none
    first_bad_cause: int  # what went non-finite in that step: LOSS, AWP_GRADIENT, AWP_SIZE or AWP_LOSS
    first_bad_layer: int  # the first AWP layer whose gradient (AWP_GRADIENT) or size (AWP_SIZE) was non-finite
    first_bad_loss: float  # that step's training loss
    longest_bad_run: int = 0  # the longest run of consecutive non-finite steps ending in this stretch (from earlier ones on)

    def describe(self, awp_names: list[str] | None) -> str:
        """The cause of the first non-finite step, as the message of a FloatingPointError would say it."""
        layer = f" in layer {awp_names[self.first_bad_layer]!r}" if awp_names else ""
        if self.first_bad_cause == AWP_GRADIENT:
            return f"AWP ascent gradient is not finite{layer}"
        if self.first_bad_cause == AWP_SIZE:
            return f"AWP perturbation is not finite{layer}: gamma * ||w|| overflows"
        if self.first_bad_cause == AWP_LOSS:
            return f"training loss is {self.first_bad_loss} at the AWP-perturbed weights w + v, finite at w"
        if self.first_bad_cause == AWP_AT_W:
            return f"training loss is {self.first_bad_loss}, and not finite at the unperturbed weights w either"
        return f"training loss is {self.first_bad_loss}"

    @property
    def blame(self) -> str:
        """The hyper-parameter(s) that made the first non-finite step so, from what went non-finite in it."""
        if self.first_bad_cause in (AWP_SIZE, AWP_LOSS):
            return "awp.gamma"  # w was fine, the perturbation v was not
        if self.first_bad_cause in (AWP_GRADIENT, AWP_AT_W):
            return "optim.lr (or awp.gamma, if it is far above the paper's 0.005-0.01)"  # w diverged, stepping at w + v
        return "optim.lr"


def skip_failure(longest_run: int, skipped: int, steps_done: int, steps_per_epoch: int) -> str:
    """Why `nonfinite=skip` must give up ("" when it need not): every step of the epoch skipped (`skipped` of
    the `steps_done` steps read so far in an epoch of `steps_per_epoch`), or MAX_SKIPPED_RUN steps in a row."""
    if steps_done >= steps_per_epoch and skipped >= steps_per_epoch:
        return f"all {steps_per_epoch} steps of epoch"
    if longest_run >= MAX_SKIPPED_RUN:
        return f"{longest_run} steps in a row in epoch"
    return ""


def kept_checkpoint(run_dir: Path, good: bool = True) -> str:
    """What is on disk to go back to, as the stop message says it (never a checkpoint that is not there)."""
    last = Path(run_dir) / "last.pt"
    if last.exists():  # checkpoints never hold non-finite weights (the loop checks them before writing)
        return f"{'last good checkpoint' if good else 'last checkpoint'} kept: {last}"
    return f"no checkpoint was written yet ({run_dir} holds none)"


def stop_message(report: StretchReport, epoch: int, awp_names: list[str] | None, run_dir: Path, *,
                 gave_up: str = "") -> str:
    """The one line a non-finite stop prints. `epoch` is 0-based. `gave_up`: why nonfinite=skip gave up
    (`skip_failure`), when it did."""
    if report.bad == 0:  # under DDP (nonfinite=stop) the bad step was another process's: it names it
        return f"non-finite value at epoch {epoch + 1} on another process; {kept_checkpoint(run_dir)}: see that process's message"
    where = f"epoch {epoch + 1}, step {report.first_bad + 1}"
    fix = f"lower {report.blame}"
    if gave_up:
        return (f"nonfinite=skip skipped {gave_up} {epoch + 1}: training makes no progress (first non-finite step "
                f"since the last read: {where}, {report.describe(awp_names)}); {kept_checkpoint(run_dir, good=False)}: {fix}")
    if report.first_bad_cause not in (AWP_SIZE, AWP_LOSS):  # a rare bad batch may be skipped; an overflowing gamma never
        fix += ", or set nonfinite=skip"
    return f"non-finite value at {where} ({report.describe(awp_names)}); {kept_checkpoint(run_dir)}: {fix}"


class StepMonitor:
    """On-device sums of the steps since the last `read`, and the first non-finite step among them."""

    def __init__(self, device: torch.device):
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x n, correct, seen
        self._bad = torch.zeros((), dtype=torch.int64, device=device)
        self._first = torch.full((4,), -1.0, dtype=torch.float64, device=device)  # step, cause, layer, loss
        self._step = torch.zeros((), dtype=torch.int64, device=device)
        self._run = torch.zeros((), dtype=torch.int64, device=device)  # consecutive non-finite steps up to now
        self._longest = torch.zeros((), dtype=torch.int64, device=device)  # longest run reached in this stretch

    def start(self, step: int) -> None:
        """The next step added has index `step` (e.g. its batch index in the epoch); sums start at zero."""
        self._step.fill_(step)
        self._reset()

    def _reset(self) -> None:
        self._sums.zero_()
        self._bad.zero_()
        self._first.fill_(-1.0)
        self._longest.copy_(self._run)  # a run still going on counts in the next stretch from where it is

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int, finite: torch.Tensor, awp=None) -> None:
        """Account one step of `n` examples; device ops only (no host synchronization). `awp`: the `AWP` that
        perturbed this step (its device-side flags tell what went non-finite), or None."""
        vals = torch.stack([loss.detach().double() * n, correct.double(), loss.new_full((), n, dtype=torch.float64)])
        self._sums += torch.where(finite, vals, 0.0)  # a non-finite step adds nothing (0 * nan would be nan)
        bad = ~finite
        first = bad & (self._bad == 0)
        cause = layer = loss.new_full((), LOSS, dtype=torch.float64)
        if awp is not None and getattr(awp, "layer_finite", None) is not None:
            grad_bad, size_bad = ~awp.layer_finite, ~awp.perturbation_finite
            layer = torch.where(grad_bad.any(), grad_bad.double().argmax(), size_bad.double().argmax()).double()
            cause = torch.where(grad_bad.any(), AWP_GRADIENT, torch.where(size_bad.any(), AWP_SIZE,
                                torch.where(awp.loss_finite, AWP_LOSS, AWP_AT_W))).double()
        record = torch.stack([self._step.double(), cause, layer, loss.detach().double()])
        self._first = torch.where(first, record, self._first)
        self._bad += bad
        self._run = torch.where(bad, self._run + 1, 0)
        self._longest = torch.maximum(self._longest, self._run)
        self._step += 1

    def read(self) -> StretchReport:
        """Everything since the last read, in one device-to-host transfer; then start a new stretch."""
        loss_sum, correct, seen, bad, longest, step, cause, layer, bad_loss = torch.cat(
            [self._sums, self._bad.double()[None], self._longest.double()[None], self._first]).tolist()
        self._reset()
        return StretchReport(loss_sum, correct, int(seen), int(bad), int(step), int(cause), int(layer), bad_loss,
                             int(longest))


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
