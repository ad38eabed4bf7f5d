"""What a run or an evaluation is computed on: the device a command asks for (`resolve_device`, the one resolver of
the library, the CLI and the benchmarks), and what it was (`describe`), for env.json and the evaluation JSON.

Enough to tell why two runs of the same recipe and seed differ: on the CPU, training is bit-identical from one
run to the next only where torch picks the same vectorised kernels (its CPU capability, e.g. AVX2 or AVX512),
which depend on the processor.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from .errors import UserError


def resolve_device(spec: str, local_rank: int | None = None, *, option: str = "device") -> torch.device:
    """The device `spec` names: auto (cuda when available, else cpu), cpu, cuda, cuda:N (or mps).

    UserError (one line, naming the `option` the user set, e.g. "--device") when it asks for CUDA and there is none.
    With `local_rank` (one process per GPU under torchrun), "cuda" is that GPU, made the current one.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option}={spec} but no CUDA device is available: use {option}=cpu or {option}=auto")
    if spec == "cuda" and local_rank is not None:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(spec)


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe(device: torch.device) -> dict[str, str]:
    """device, device_name (the GPU's on CUDA, else the CPU's), the CPU and torch's CPU capability."""
    cpu = cpu_name()
    return {"platform": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
