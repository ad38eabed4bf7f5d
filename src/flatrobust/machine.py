"""What a run or an evaluation was computed on, for env.json and the evaluation JSON.

Enough to tell why two runs of the same recipe and seed differ: on the CPU, training is bit-identical from one
run to the next only where torch picks the same vectorised kernels (its CPU capability, e.g. AVX2 or AVX512),
which depend on the processor.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch


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
