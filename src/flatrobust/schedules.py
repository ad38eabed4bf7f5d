"""Learning-rate schedules: the official training script's nine `--lr-schedule` names and flatrobust's own three.

Every schedule is a pure function of the iteration. The official script (Rice et al. 2020's `train_cifar.py`, which
the AWP code of Wu et al. 2020 inherits) sets the rate before each iteration from the fractional epoch
`t = epoch + (i + 1) / batches_per_epoch` (in epochs, so `t = (step + 1) / steps_per_epoch` with `step` 0-based and
counted over the whole run): `official_lr(name, t, ...)` is that rule, term for term. flatrobust's own names predate
it and keep their rule, `progress = step / total_steps`, so that runs trained with them resume and re-run bit for
bit; `piecewise` under flatrobust's rule decays one iteration later than the official one.

The official script declares two more names, `piecewisesmoothed` and `piecewisezoom`, but defines no schedule
for them (choosing either fails there before the first step): there is nothing to reproduce, so flatrobust refuses
them with that reason instead of inventing a curve.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

OWN = ("piecewise", "cosine", "constant")  # flatrobust's names: progress = step / total_steps
OFFICIAL = ("superconverge", "piecewise", "linear", "onedrop", "multipledecay", "cosine", "cyclic")  # t = (step + 1) / spe
DECLARED_ONLY = ("piecewisesmoothed", "piecewisezoom")  # in the official script's choices, with no definition there
# recipe values: the own names as they were, the official ones (same curve as an own name) under `official_<name>`
NAMES = (*OWN, "superconverge", "linear", "onedrop", "multipledecay", "cyclic", "official_piecewise", "official_cosine")


def _interp(t: float, xs: list[float], ys: list[float]) -> float:
    """numpy.interp for one point: linear between the knots, flat outside them."""
    if t <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if t <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (t - x0) / (x1 - x0)
    return ys[-1]


def official_lr(name: str, t: float, epochs: int, lr_max: float, lr_one_drop: float = 0.01, lr_drop_epoch: int = 100) -> float:
    """The official `lr_schedule(t)` of `--lr-schedule name`, `t` in epochs (fractional)."""
    e = epochs
    if name == "superconverge":  # one cycle: up to lr_max at 40% (integer epochs), down to 0 at the end
        return _interp(t, [0, e * 2 // 5, e], [0, lr_max, 0])
    if name == "piecewise":  # /10 at 50%, /100 at 75% of training
        return lr_max if t / e < 0.5 else lr_max / 10 if t / e < 0.75 else lr_max / 100
    if name == "linear":  # flat for a third, then linear to /10 at two thirds and /100 at the end
        return _interp(t, [0, e // 3, e * 2 // 3, e], [lr_max, lr_max, lr_max / 10, lr_max / 100])
    if name == "onedrop":  # lr_max until lr_drop_epoch, then lr_one_drop
        return lr_max if t < lr_drop_epoch else lr_one_drop
    if name == "multipledecay":  # minus lr_max/10 every tenth of training (epochs // 10 epochs)
        return lr_max - (t // (e // 10)) * (lr_max / 10)
    if name == "cosine":
        return lr_max * 0.5 * (1 + math.cos(t / e * math.pi))
    if name == "cyclic":  # triangle: 0 -> lr_max at 40% -> 0
        return _interp(t, [0, 0.4 * e, e], [0, lr_max, 0])
    raise ValueError(f"no official schedule {name!r}")


@dataclass(frozen=True)
class Schedule:
    """optim.schedule with its parameters, for a run of `epochs` epochs of `steps_per_epoch` iterations."""

    name: str
    lr_max: float
    epochs: int
    steps_per_epoch: int
    lr_one_drop: float = 0.01  # onedrop: the rate after lr_drop_epoch (official --lr-one-drop)
    lr_drop_epoch: int = 100  # onedrop: the epoch of the drop (official --lr-drop-epoch)

    def __call__(self, step: int) -> float:
        """The rate of iteration `step` (0-based, over the whole run)."""
        if self.name in ("piecewise", "cosine", "constant"):  # flatrobust's rule
            progress = step / max(self.epochs * self.steps_per_epoch, 1)
            if self.name == "piecewise":
                return self.lr_max if progress < 0.5 else self.lr_max / 10 if progress < 0.75 else self.lr_max / 100
            if self.name == "cosine":
                return 0.5 * self.lr_max * (1 + math.cos(math.pi * progress))
            return self.lr_max
        official = self.name.removeprefix("official_")
        return official_lr(official, (step + 1) / self.steps_per_epoch, self.epochs, self.lr_max, self.lr_one_drop, self.lr_drop_epoch)


def check(name: str, epochs: int) -> str | None:
    """Why `name` cannot schedule a run of `epochs` epochs (one line), or None when it can."""
    if name in DECLARED_ONLY:
        return (f"optim.schedule={name!r}: the official script lists it among --lr-schedule's choices but defines no "
                f"schedule for it (it fails there), so there is nothing to reproduce; choose from {', '.join(NAMES)}")
    if name not in NAMES:
        close = difflib.get_close_matches(name, [*NAMES, *DECLARED_ONLY], n=1)
        return f"optim.schedule={name!r} is not a schedule" + (f" (did you mean {close[0]!r}?)" if close else "") + \
            f": choose from {', '.join(NAMES)}"
    if name == "multipledecay" and epochs < 10:
        return f"optim.schedule='multipledecay' lowers the rate every epochs // 10 epochs: it needs epochs >= 10, got {epochs}"
    return None
