"""TensorBoard logging of a training run (`log.tensorboard: true`; the optional extra `[tensorboard]`).

metrics.jsonl stays the record; the event files under RUN_DIR/tensorboard are a view of it for watching
runs (`tensorboard --logdir runs`). Every scalar is written at the global training step:

    epoch/<key>       every number of the epoch's metrics.jsonl line (key as there, booleans as 0/1), at the
                      step that ends the epoch; "step" itself is the x-axis and is not written
    step/train_loss   the mean training loss (at w + v with AWP) of the steps since the previous point, every
                      `log.interval` steps within an epoch and at its end

A run resumed from a checkpoint taken at step s tells TensorBoard to drop what the interrupted process wrote
after s (`purge_step`), so no point appears twice; the first loss point after s averages the steps since s.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import UserError

STEP_LOSS_TAG = "step/train_loss"


def epoch_tags(record: dict[str, Any]) -> dict[str, float]:
    """tag -> value of the scalars written for one metrics.jsonl line."""
    return {f"epoch/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))}


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("log.tensorboard=true needs the tensorboard package, which is not installed: "
                        "pip install 'flatrobust[tensorboard]' (or pip install tensorboard), or set log.tensorboard=false") from None
    return SummaryWriter


def require_tensorboard() -> None:
    """UserError (one line) when tensorboard is missing: called before anything is written."""
    _summary_writer()


class TensorBoardLog:
    """The event file of one training process; `resumed_at`: the step of the checkpoint a resumed run starts from."""

    def __init__(self, log_dir: str | Path, resumed_at: int | None = None):
        self.writer = _summary_writer()(log_dir=str(log_dir), purge_step=None if resumed_at is None else resumed_at + 1)
        self._loss_sum, self._seen = 0.0, 0

    def step(self, step: int, loss_sum: float, seen: int, write: bool) -> None:
        """Count a training step (its loss summed over its `seen` examples) that ends at global step `step`; with
        `write`, one step/train_loss point there: the mean over the steps since the previous point."""
        self._loss_sum += loss_sum
        self._seen += seen
        if write and self._seen:
            self.writer.add_scalar(STEP_LOSS_TAG, self._loss_sum / self._seen, step)
            self._loss_sum, self._seen = 0.0, 0

    def write_epoch(self, record: dict[str, Any]) -> None:
        for tag, value in epoch_tags(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
