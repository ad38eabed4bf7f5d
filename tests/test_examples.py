"""The runnable examples as a user runs them (`python examples/X.py`), and the docs' claim about their cost checked
against what bench/examples_time.py measured (a benchmark, not a timed test: the machine is shared)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "examples_cpu.json"
# example -> what its output must say (each reads only what the set-up installs: no download)
EXAMPLES = {"lightning_awp.py": "4 epochs on 1,400 digits", "hf_trainer_awp.py": "60 steps"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_as_a_user_runs_it(name):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True, text=True, timeout=600,
                         check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert EXAMPLES[name] in out, out


def test_the_benchmark_covers_every_example_and_the_docs_claim_holds_in_it():
    """docs/TRAINERS.md and each example's docstring say 'well under a minute on a CPU': the median CPU time
    bench/examples_time.py measured (one thread) for every example is below 60 s."""
    listed = re.search(r"^EXAMPLES = \((.*)\)$", (ROOT / "bench" / "examples_time.py").read_text(), re.M).group(1)
    assert sorted(re.findall(r'"([\w.]+)"', listed)) == sorted(EXAMPLES)
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES), "a new example needs a row here"
    measured = json.loads(RESULT.read_text())["examples"]
    assert sorted(measured) == sorted(EXAMPLES)
    for name, e in measured.items():
        assert e["median_cpu_s"] < 60, f"{name}: {e['median_cpu_s']:.0f} s of CPU time, the docs say well under a minute"
    assert "under a minute on a CPU" in (ROOT / "docs" / "TRAINERS.md").read_text()
