"""Shared pieces of the benchmark scripts: interleaved timing, peak memory, environment, Markdown tables.

Timing is interleaved on purpose: on a shared or thermally throttled machine the speed drifts over
minutes, so the methods are run round-robin (one round = every method once, the order rotated each
round), and medians are taken per method and per round-wise ratio. Drift then hits every method alike
and cancels in the ratios, which are the numbers the targets are about.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from flatrobust.machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(spec: str) -> torch.device:
    """`flatrobust.machine.resolve_device` for a benchmark's --device: its one-line error ends the script."""
    from flatrobust.errors import UserError
    from flatrobust.machine import resolve_device as resolve

    try:
        return resolve(spec, option="--device")
    except UserError as e:
        sys.exit(str(e))


def interleaved(fns: dict[str, Callable[[], object]], *, device: torch.device, warmup: int, repeats: int,
                calls: int = 1, log: Callable[[str], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Time every fn in `fns` round-robin: `warmup` untimed calls each, then `repeats` rounds of `calls`
    timed calls each. Returns {name: {"wall": [s per call, one per round], "cpu": [...]}}.

    "cpu" is this process's CPU time (all threads) per call: unlike wall time it does not grow when other
    processes take the cores, so it is the steadier of the two on a shared machine.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
        sync(device)
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no method always runs first
        for name in order:
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fns[name]()
            sync(device)
            out[name]["wall"].append((time.perf_counter() - w0) / calls)
            out[name]["cpu"].append((time.process_time() - c0) / calls)
        if log is not None:
            log(f"round {r + 1}/{repeats}: " + "  ".join(f"{n} {out[n]['wall'][-1]:.3f}s" for n in names))
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def quartiles(xs: list[float]) -> tuple[float, float]:
    """(25th, 75th) percentile; both equal the value for a single sample."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """Median (and quartiles) of the per-round ratios num[r] / den[r]."""
    rs = [a / b for a, b in zip(num, den)]
    lo, hi = quartiles(rs)
    return {"median": median(rs), "q25": lo, "q75": hi, "per_round": rs}


def peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Peak memory allocated by torch while `fn()` runs, above the level just before it: (bytes, how).

    CUDA: torch.cuda.max_memory_allocated. CPU: the allocation events of torch.profiler with
    profile_memory=True, each of which carries the CPU allocator's size; their running sum is the
    allocated level over time (tracemalloc does not see torch's allocator). Returns (None, reason) when
    the profiler's event tree is not available in this torch version.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
                sizes.append((e.start_time_ns, e.typed[1].alloc_size))  # > 0 allocation, < 0 free
        level = peak = 0
        for _, size in sorted(sizes):
            level += size
            peak = max(peak, level)
        return peak, "torch.profiler(profile_memory=True) CPU allocation events"
    except Exception as e:  # a private API: report instead of failing the benchmark
        return None, f"not measured ({type(e).__name__}: {e})"


def environment(device: torch.device) -> dict:
    """Where and how a result was measured; the scripts call it when the measurement is done, so `date`
    and the load average are those of the end of the run."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5)
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "python": sys.version.split()[0], "torch": torch.__version__, "device": str(device),
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "git_commit": git("rev-parse", "HEAD"),
        "load_average_1_5_15min": os.getloadavg() if hasattr(os, "getloadavg") else None,  # at `date`
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, data: dict) -> None:
    """`flatrobust.atomic.write_json` when --out is given, and say so."""
    from flatrobust.atomic import write_json as write

    if not path:
        return
    write(path, data)
    print(f"wrote {path}", file=sys.stderr)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
