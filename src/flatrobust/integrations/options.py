"""What both trainer adapters check of their AWP options before any training starts (one line each, ValueError)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..awp import AWP

RESTORE = ("after_step", "before_step")  # when w <- w - v: after the optimizer step (the paper) or before it (the snippet)


def check_options(owner: str, restore_key: str, restore: str, options: dict[str, Any], *gamma: float, patterns_hint: str,
                  scaler_source: str) -> None:
    """`restore` is one of RESTORE; `options` names neither `params` (the adapter chooses the weights: `patterns_hint`
    says how) nor `scaler` (the adapter takes `scaler_source`'s); every other AWP option is valid (AWP itself checks
    them on a one-weight model; `patterns` is checked against the real model later)."""
    if restore not in RESTORE:
        raise ValueError(f"{owner} {restore_key} must be one of {', '.join(RESTORE)}, got {restore!r}")
    for key in ("params", "scaler"):
        if key in options:
            raise ValueError(f"{owner} sets AWP's {key} itself: use {patterns_hint} to choose the weights"
                             if key == "params" else f"{owner} takes {scaler_source} GradScaler itself")
    AWP(nn.Linear(1, 1), *gamma, **{k: v for k, v in options.items() if k != "patterns"})  # a bad value fails here
