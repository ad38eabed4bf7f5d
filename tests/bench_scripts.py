"""Load a script of study/ or bench/ (not packages) as a module, for the tests of the study and the benchmarks."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
STUDY = ROOT / "study"  # the research pipeline behind docs/RESULTS.md


def load(name: str):
    """study/<name>.py or bench/<name>.py as the module `name` (registered in sys.modules: dataclasses look their module
    up there)."""
    if name in sys.modules:
        return sys.modules[name]
    path = STUDY / f"{name}.py" if (STUDY / f"{name}.py").is_file() else BENCH / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
