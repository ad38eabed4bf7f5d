"""CPU and wall time of the runnable examples (examples/*.py) as a user runs them: `python examples/X.py`, one torch
thread, each a separate process, round-robin over `--repeats` rounds; medians per example.

    python bench/examples_time.py --repeats 3 --out bench/results/examples_cpu.json

CPU time (user + system of the example's process, from the operating system) is what an idle machine's wall time
would be with one thread; the wall time beside it grows with whatever else the machine runs (the load average is in
the JSON). docs/TRAINERS.md's "each well under a minute on a CPU" is checked against this file by
tests/test_examples.py.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, markdown_table, write_json  # noqa: E402

EXAMPLES = ("lightning_awp.py", "hf_trainer_awp.py")


def run_once(name: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one `python examples/<name>` with one thread; CalledProcessError if it fails."""
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "examples" / name)], check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds (every example once per round)")
    ap.add_argument("--out", default=None, help="write every number and the environment as JSON")
    args = ap.parse_args(argv)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in EXAMPLES}
    for r in range(args.repeats):
        for name in EXAMPLES[r % len(EXAMPLES):] + EXAMPLES[:r % len(EXAMPLES)]:  # order rotated each round
            runs[name].append(run_once(name))
            print(f"round {r + 1}/{args.repeats}: {name} {runs[name][-1][0]:.1f} s CPU, {runs[name][-1][1]:.1f} s wall",
                  file=sys.stderr, flush=True)
    result = {"command": "python bench/examples_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "examples": {name: {"cpu_s": [c for c, _ in v], "wall_s": [w for _, w in v],
                                  "median_cpu_s": statistics.median(c for c, _ in v),
                                  "median_wall_s": statistics.median(w for _, w in v)} for name, v in runs.items()},
              "environment": environment(torch.device("cpu"))}
    print(markdown_table(["example", "median CPU s", "median wall s", "runs"],
                         [[f"`examples/{n}`", f"{e['median_cpu_s']:.1f}", f"{e['median_wall_s']:.1f}", str(len(e["cpu_s"]))]
                          for n, e in result["examples"].items()]))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
