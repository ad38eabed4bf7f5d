"""Speed switches of the training loop: mixed precision, channels_last, torch.compile.

Each is a config switch (`speed.*`). `auto` turns on what is safe on the device: bf16 autocast and
channels_last on CUDA, nothing on CPU (CPU bf16 autocast is available with `speed.amp=bf16`).
Weights, optimizer state and AWP's perturbation stay in fp32 (master weights); only the forward
passes run under autocast, and logits come back in fp32 so attacks and losses are computed in fp32.
"""
from __future__ import annotations

import torch
from torch import nn


class Autocast(nn.Module):
    """Runs `inner` under `torch.autocast(device, dtype)` and returns fp32 logits.

    The attribute is called `inner` (not `module`) on purpose: AWP unwraps DDP's `.module`, and must not
    unwrap this one.
    """

    def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype, channels_last: bool = False):
        super().__init__()
        self.inner = inner
        self.device_type = device_type
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype == torch.float32:  # channels_last alone: no autocast region at all
            return self.inner(x)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(x).float()


def resolve(amp: str, channels_last: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last) for the config values and the device."""
    cuda = device.type == "cuda"
    dtype = {"off": None, "bf16": torch.bfloat16, "auto": torch.bfloat16 if cuda else None}[amp]
    cl = {"auto": cuda, "on": True, "off": False}[channels_last]
    return dtype, cl


def accelerate(model: nn.Module, device: torch.device, *, amp: str = "auto", channels_last: str = "auto",
               compile: bool = False) -> nn.Module:
    """The module to call in the loop; `model` itself (fp32 weights) is what is optimized and saved."""
    dtype, cl = resolve(amp, channels_last, device)
    if cl:
        model.to(memory_format=torch.channels_last)
    fwd: nn.Module = model
    if dtype is not None or cl:
        fwd = Autocast(model, device.type, dtype if dtype is not None else torch.float32, cl)
        if dtype is None:  # channels_last alone: autocast to fp32 is a no-op
            fwd.dtype = torch.float32
    if compile:
        fwd = torch.compile(fwd)
    return fwd
